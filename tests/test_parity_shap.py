"""fastattr.ShapExplainer against the real PyHealth 2.1.0 ShapExplainer (Kernel SHAP).

Both classes are built with the same arguments on the same real PyHealth model and called on the same batch
(``tests/pyhealth_cases.py``). Compared per feature key: the key sets, shapes, dtypes and devices exactly, and
the values to a relative error ``rel_err(got, ref) <= 1e-4`` (conftest: the largest |difference| over the
reference's largest |value|); every reference is checked to be non-trivial.

Cases: Transformer binary / multiclass / multilabel on flat sequences and binary / multiclass on nested ones,
MLP with token + continuous tensor features and with a tensor feature alone, StageNet and StageAttentionNet on
StageNet (time, value) tuples; each with ``use_embeddings`` True and False (PyHealth gives both the same
numbers). Then a custom and a one-row broadcast ``baseline=``, ``target_class_idx`` (int, NumPy, tensor; a
no-op for one logit), ``regularization``, other ``random_seed`` values, a batch of one, a batch with one patient
5x longer than the rest, PyHealth's defaults (1000 coalitions) on a batch of two, ``random_seed=None`` (global
RNG seeded identically before each side: same numbers and the same RNG state after), the caller's torch /
Python / NumPy RNG states around a seeded call, ``__call__``; and the same exception type (or a subclass)
wherever PyHealth raises: RNN (no Interpretable; its forward wants the label SHAP filters out), a Transformer
over a continuous tensor feature, a baseline missing a key / with float token ids / of a wrong batch size, an
out-of-range target.

PyHealth's answer is an ill-conditioned float32 weighted least-squares solve (torch.linalg.lstsq, rank-revealing
on CPU; edge coalitions weigh 1000, sampled ones 1e-1..1e-12, ridge 1e-6): any change in the last bits of the
model outputs moves the attributions by up to ~2e-5 relative at 128 coalitions (~9e-5 at 32, ~4e-3 for 50
features at 128), so the cases use 128 coalitions (256 and 1000 where the feature count asks for it) to keep
that noise floor 5x under the tolerance.
"""
import functools
import random

import numpy as np
import pytest
import torch
from conftest import rel_err

import fastattr

pytestmark = pytest.mark.parity

TOL = 1e-4

# name: (builder kind, PyHealth model, classes, model kwargs, extra build kwargs)
CONFIGS = {
    "transformer-1L1H-binary-seq": ("seq", "Transformer", 2, dict(num_layers=1, heads=1, embedding_dim=16), {}),
    "transformer-2L2H-multiclass-seq": ("seq", "Transformer", 4, dict(num_layers=2, heads=2, embedding_dim=16), {}),
    "transformer-1L2H-multilabel-seq": ("seq", "Transformer", 3, dict(num_layers=1, heads=2, embedding_dim=16),
                                        dict(mode="multilabel")),
    "transformer-2L2H-binary-nested": ("nested", "Transformer", 2, dict(num_layers=2, heads=2, embedding_dim=16), {}),
    "transformer-1L1H-multiclass-nested": ("nested", "Transformer", 3, dict(num_layers=1, heads=1, embedding_dim=16),
                                           {}),
    "mlp-seq+tensor": ("mlp", "MLP", 3, dict(embedding_dim=16, hidden_dim=16), {}),
    # 5 features in all: 2**5 = 32 < max_coalitions, so PyHealth samples only 32 coalitions
    "mlp-tensor-only": ("tensor_only", "MLP", 2, dict(embedding_dim=16, hidden_dim=16), {}),
    "stagenet": ("stagenet", "StageNet", 3, dict(embedding_dim=16, chunk_size=16, levels=2), dict(batch=3)),
    "stageattentionnet": ("stagenet", "StageAttentionNet", 2, dict(embedding_dim=16, chunk_size=16, levels=2),
                          dict(batch=3)),
}
COALITIONS = 128
MULTICLASS = [n for n, c in CONFIGS.items() if c[2] > 2]
# models PyHealth's ShapExplainer cannot explain: (kind, model, classes, model kwargs, use_embeddings, where it raises)
FAILING = {
    # RNN is no Interpretable: use_embeddings=True is refused in the constructor ...
    "rnn-embeddings": ("seq", "RNN", 2, dict(embedding_dim=16, hidden_dim=16), True, "init"),
    # ... and without embeddings its forward reads the label, which SHAP filters out of the batch
    "rnn-no-embeddings": ("seq", "RNN", 2, dict(embedding_dim=16, hidden_dim=16), False, "attribute"),
    # a continuous tensor is one token to the Transformer, but the appended mask is [B, 6]
    "transformer-seq+tensor-embeddings": ("seq_tensor", "Transformer", 3,
                                          dict(num_layers=1, heads=2, embedding_dim=16), True, "attribute"),
    "transformer-seq+tensor-no-embeddings": ("seq_tensor", "Transformer", 3,
                                             dict(num_layers=1, heads=2, embedding_dim=16), False, "attribute"),
}


@functools.lru_cache(maxsize=None)
def built(kind, model_name, classes, model_kwargs, build_kwargs, seed):
    import pyhealth_cases

    return pyhealth_cases.build(kind, model_name, num_classes=classes, seed=seed, **dict(model_kwargs),
                                **dict(build_kwargs))


def case(name, batch=None):
    """(model, batch) of ``CONFIGS[name]``; ``batch``: another batch size (same data, same weights)."""
    kind, model_name, classes, model_kwargs, build_kwargs = CONFIGS[name]
    build_kwargs = dict(build_kwargs, **({"batch": batch} if batch else {}))
    return built(kind, model_name, classes, tuple(sorted(model_kwargs.items())), tuple(sorted(build_kwargs.items())),
                 len(name))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread for this module: the models are tiny, and on a loaded 2-core machine two OpenMP
    threads per forward spin-wait each call 10-100x slower. Both sides run under the same setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def theirs_cls():
    from pyhealth.interpret.methods import ShapExplainer

    return ShapExplainer


def ours_cls():
    return fastattr.ShapExplainer


def value_of(model, batch, key):
    feature = batch[key]
    return feature if isinstance(feature, torch.Tensor) else feature[model.dataset.input_processors[key].schema()
                                                                      .index("value")]


def custom_baseline(model, batch, broadcast=False):
    """A real code (id 2) for token features, 0.3 for continuous ones; ``broadcast``: one row for all samples.
    A key that is no feature ("label") rides along: PyHealth ignores it."""
    out = {"label": torch.zeros(3)}
    for key in model.feature_keys:
        value = value_of(model, batch, key)
        value = value[:1] if broadcast else value
        out[key] = torch.full_like(value, 2) if model.dataset.input_processors[key].is_token() \
            else torch.full_like(value, 0.3)
    return out


def assert_parity(ours, theirs):
    assert set(ours) == set(theirs)
    for key in theirs:
        ref, got = theirs[key], ours[key]
        assert isinstance(got, torch.Tensor), key
        assert got.shape == ref.shape, f"{key}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
        assert got.dtype == ref.dtype, f"{key}: dtype {got.dtype} != {ref.dtype}"
        assert got.device == ref.device, key
        assert not got.requires_grad, key
        assert ref.abs().max() > 0 and ref.max() > ref.min(), f"{key}: reference attribution is trivial"
        err = rel_err(got, ref)
        assert err <= TOL, f"{key}: relative error {err:.2e}"


def run_both(model, batch, init=None, **call):
    """Attribute with both classes (same constructor args ``init``, same call args); return (ours, theirs)."""
    init = dict(dict(max_coalitions=COALITIONS), **(init or {}))
    theirs = theirs_cls()(model, **init).attribute(**call, **batch)
    ours = ours_cls()(model, **init).attribute(**call, **batch)
    return ours, theirs


@pytest.mark.parametrize("use_embeddings", [True, False], ids=["embeddings", "no-embeddings"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_default_baseline(name, use_embeddings):
    model, batch = case(name)
    assert_parity(*run_both(model, batch, dict(use_embeddings=use_embeddings)))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_custom_baseline(name):
    model, batch = case(name)
    assert_parity(*run_both(model, batch, baseline=custom_baseline(model, batch)))


@pytest.mark.parametrize("use_embeddings", [True, False], ids=["embeddings", "no-embeddings"])
@pytest.mark.parametrize("name", ["transformer-2L2H-multiclass-seq", "mlp-seq+tensor", "stagenet"])
def test_broadcast_baseline(name, use_embeddings):
    # one baseline row for the whole batch: PyHealth only broadcasts it against the batch
    model, batch = case(name)
    base = custom_baseline(model, batch, broadcast=True)
    assert_parity(*run_both(model, batch, dict(use_embeddings=use_embeddings), baseline=base))


@pytest.mark.parametrize("name", MULTICLASS)
def test_target_class_idx(name):
    model, batch = case(name)
    assert_parity(*run_both(model, batch, target_class_idx=0))
    assert_parity(*run_both(model, batch, baseline=custom_baseline(model, batch),
                            target_class_idx=CONFIGS[name][2] - 1))


def test_target_class_idx_numpy_and_tensor():
    model, batch = case("transformer-2L2H-multiclass-seq")
    assert_parity(*run_both(model, batch, target_class_idx=np.int64(3)))
    assert_parity(*run_both(model, batch, target_class_idx=torch.tensor(1)))


def test_target_class_idx_binary_is_ignored():
    model, batch = case("transformer-1L1H-binary-seq")
    assert_parity(*run_both(model, batch, target_class_idx=1))


@pytest.mark.parametrize("name", ["transformer-2L2H-multiclass-seq", "mlp-seq+tensor"])
def test_regularization(name):
    model, batch = case(name)
    assert_parity(*run_both(model, batch, dict(regularization=1e-2)))


@pytest.mark.parametrize("name", ["transformer-1L1H-binary-seq", "transformer-1L1H-multiclass-nested",
                                  "mlp-seq+tensor", "stagenet"])
def test_batch_of_one(name):
    model, batch = case(name, batch=1)
    assert len(batch["patient_id"]) == 1
    assert_parity(*run_both(model, batch))


def with_long_patient(batch, key, long=None, short=None):
    """The batch with patient 0's codes of ``key`` tiled to ``long`` (default: 5x the others' longest) and the
    others' cut to their first ``short`` (default: all), right-padded with 0 as PyHealth's collate does."""
    value = batch[key]
    rows = [v[v != 0] for v in value]
    rows[1:] = [r[:short] for r in rows[1:]]
    long = long or 5 * max(len(r) for r in rows[1:])
    rows[0] = rows[0].repeat(-(-long // len(rows[0])))[:long]
    out = torch.zeros(len(rows), long, dtype=value.dtype)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return {**batch, key: out}


@pytest.mark.parametrize("use_embeddings", [True, False], ids=["embeddings", "no-embeddings"])
@pytest.mark.parametrize("name", ["transformer-2L2H-multiclass-seq", "mlp-seq+tensor"])
@pytest.mark.parametrize("shape", ["10-vs-2", "5x"])
def test_unequal_lengths(name, use_embeddings, shape):
    """One patient 5x longer than the rest. "10-vs-2": 15 features in all, attributions still vary along the
    long row. "5x": ~50 features, where PyHealth's sampled coalitions weigh ~1e-12 against the 1e-6 ridge and
    each row's attribution degenerates to one value (the full coalition's output spread evenly over all
    positions, padding included): the feature count must be the padded width."""
    model, batch = case(name)
    batch = with_long_patient(batch, "conditions", *((10, 2) if shape == "10-vs-2" else ()))
    lengths = (batch["conditions"] != 0).sum(1)
    assert lengths[0] >= 5 * lengths[1:].max()
    ours, theirs = run_both(model, batch, dict(use_embeddings=use_embeddings, max_coalitions=256))
    assert_parity(ours, theirs)
    row = theirs["conditions"][0]
    spread = float((row.max() - row.min()) / row.abs().max())
    assert spread > 0.1 if shape == "10-vs-2" else spread < 1e-3, spread


def test_pyhealth_defaults():
    # n_background_samples=100, max_coalitions=1000, regularization=1e-6, random_seed=42
    model, batch = case("transformer-1L1H-binary-seq", batch=2)
    theirs = theirs_cls()(model)
    ours = ours_cls()(model)
    for attr in ("use_embeddings", "n_background_samples", "max_coalitions", "regularization", "random_seed"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert_parity(ours.attribute(**batch), theirs.attribute(**batch))


@pytest.mark.parametrize("name", ["transformer-2L2H-multiclass-seq", "stagenet"])
def test_unseeded_uses_global_rng_like_pyhealth(name):
    """random_seed=None: coalitions come from the caller's global RNG; same seed, same draws, same state after."""
    model, batch = case(name)
    init = dict(random_seed=None, max_coalitions=COALITIONS)
    torch.manual_seed(1234)
    theirs = theirs_cls()(model, **init).attribute(**batch)
    theirs_after = torch.get_rng_state()
    torch.manual_seed(1234)
    ours = ours_cls()(model, **init).attribute(**batch)
    ours_after = torch.get_rng_state()
    assert_parity(ours, theirs)
    assert torch.equal(ours_after, theirs_after), "global RNG advanced differently from PyHealth's call"
    # and the seed really matters: another global seed gives other coalitions
    torch.manual_seed(4321)
    other = ours_cls()(model, **init).attribute(**batch)
    assert any(rel_err(other[k], theirs[k]) > TOL for k in theirs)


@pytest.mark.parametrize("cls", ["ours", "theirs"])
def test_seeded_call_leaves_global_rng_unchanged(cls):
    model, batch = case("transformer-1L1H-binary-seq")
    explainer = (ours_cls() if cls == "ours" else theirs_cls())(model, max_coalitions=COALITIONS, random_seed=7)
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()
    first = explainer.attribute(**batch)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1]
    after_np = np.random.get_state()
    assert after_np[0] == before[2][0] and np.array_equal(after_np[1], before[2][1]) and after_np[2:] == before[2][2:]
    # the seed is reapplied on every call: the same result again, whatever the global state
    torch.manual_seed(5)
    again = explainer.attribute(**batch)
    for key in first:
        assert torch.equal(first[key], again[key]), key


@pytest.mark.parametrize("seed", [0, 2024])
def test_other_random_seed(seed):
    model, batch = case("mlp-seq+tensor")
    assert_parity(*run_both(model, batch, dict(random_seed=seed)))


def test_call_interface():
    model, batch = case("transformer-2L2H-multiclass-seq")
    theirs = theirs_cls()(model, max_coalitions=COALITIONS)(target_class_idx=2, **batch)
    ours = ours_cls()(model, max_coalitions=COALITIONS)(target_class_idx=2, **batch)
    assert_parity(ours, theirs)


@pytest.mark.parametrize("name", list(FAILING))
def test_same_errors_as_pyhealth(name):
    """Where PyHealth raises (in the constructor or in attribute), fastattr raises there too, an exception of
    PyHealth's type (or a subclass)."""
    kind, model_name, classes, model_kwargs, use_embeddings, where = FAILING[name]
    model, batch = built(kind, model_name, classes, tuple(sorted(model_kwargs.items())), (), len(name))
    init = dict(use_embeddings=use_embeddings, max_coalitions=8)
    if where == "init":
        with pytest.raises(Exception) as pyhealth_error:
            theirs_cls()(model, **init)
        with pytest.raises(pyhealth_error.type):
            ours_cls()(model, **init)
        return
    theirs, ours = theirs_cls()(model, **init), ours_cls()(model, **init)
    with pytest.raises(Exception) as pyhealth_error:
        theirs.attribute(**batch)
    with pytest.raises(pyhealth_error.type):
        ours.attribute(**batch)


def bad_call(variant, model, batch):
    base = custom_baseline(model, batch)
    if variant == "baseline-missing-a-key":
        del base["procedures"]
    elif variant == "baseline-float-token-ids":
        base["conditions"] = base["conditions"].float()
    elif variant == "baseline-wrong-batch":
        base["conditions"] = base["conditions"][:2]
    else:
        return dict(target_class_idx=7)
    return dict(baseline=base)


@pytest.mark.parametrize("use_embeddings", [True, False], ids=["embeddings", "no-embeddings"])
@pytest.mark.parametrize("variant", ["baseline-missing-a-key", "baseline-float-token-ids", "baseline-wrong-batch",
                                     "target-out-of-range"])
def test_bad_call_raises_like_pyhealth(variant, use_embeddings):
    model, batch = case("transformer-2L2H-multiclass-seq")
    call = bad_call(variant, model, batch)
    init = dict(use_embeddings=use_embeddings, max_coalitions=8)
    with pytest.raises(Exception) as pyhealth_error:
        theirs_cls()(model, **init).attribute(**call, **batch)
    with pytest.raises(pyhealth_error.type):
        ours_cls()(model, **init).attribute(**call, **batch)
