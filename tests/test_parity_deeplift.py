"""fastattr's DeepLift against the real PyHealth 2.1.0 DeepLift.

Both classes are built with the same arguments on the same real PyHealth model and called on the same batch
(``tests/pyhealth_cases.py``). Compared per feature key: key sets and order, shapes, dtypes and devices exactly,
and values to ``rel_err(got, ref) <= 1e-4`` (conftest: the largest |difference| over the reference's largest
|value|); every reference is checked to be non-trivial.

Cases: Transformer binary / multiclass / multilabel on flat sequences, binary / multiclass on nested ones, MLP
with token + continuous tensor features and with a tensor feature alone (``use_embeddings`` both ways),
StageNet and StageAttentionNet on StageNet (time, value) tuples; a custom baseline, ``target_class_idx`` (int,
NumPy), a batch of one, one patient 5x longer than the rest, ``__call__``. Where PyHealth raises, fastattr
raises an exception of PyHealth's type (or a subclass): RNN (no Interpretable), token features with
``use_embeddings=False``, a baseline missing a key / with float token ids / of a wrong batch size, a class out
of range. This module also holds the parity tier's shared builders for AttentionRollout and RandomBaseline.
"""
import functools

import numpy as np
import pytest
import torch
from conftest import rel_err

from fastattr.interpret.gradient.deeplift import DeepLift

pytestmark = pytest.mark.parity

TOL = 1e-4

# name: (builder kind, PyHealth model, classes, model kwargs, extra build kwargs)
CONFIGS = {
    "transformer-2L2H-binary-seq": ("seq", "Transformer", 2, dict(num_layers=2, heads=2, embedding_dim=16), {}),
    "transformer-2L2H-multiclass-seq": ("seq", "Transformer", 4, dict(num_layers=2, heads=2, embedding_dim=16), {}),
    "transformer-1L2H-multilabel-seq": ("seq", "Transformer", 3, dict(num_layers=1, heads=2, embedding_dim=16),
                                        dict(mode="multilabel")),
    "transformer-2L2H-binary-nested": ("nested", "Transformer", 2, dict(num_layers=2, heads=2, embedding_dim=16), {}),
    "transformer-1L1H-multiclass-nested": ("nested", "Transformer", 3, dict(num_layers=1, heads=1, embedding_dim=16),
                                           {}),
    "mlp-seq+tensor": ("mlp", "MLP", 3, dict(embedding_dim=16, hidden_dim=16), {}),
    "mlp-tensor-only": ("tensor_only", "MLP", 2, dict(embedding_dim=16, hidden_dim=16), {}),
    "stagenet": ("stagenet", "StageNet", 3, dict(embedding_dim=16, chunk_size=16, levels=2), dict(batch=3)),
    "stageattentionnet": ("stagenet", "StageAttentionNet", 2, dict(embedding_dim=16, chunk_size=16, levels=2),
                          dict(batch=3)),
}
MULTICLASS = [n for n, c in CONFIGS.items() if c[2] > 2]


@functools.lru_cache(maxsize=None)
def built(kind, model_name, classes, model_kwargs, build_kwargs, seed):
    import pyhealth_cases

    return pyhealth_cases.build(kind, model_name, num_classes=classes, seed=seed, **dict(model_kwargs),
                                **dict(build_kwargs))


def case(name, batch=None, configs=CONFIGS):
    """(model, batch) of ``configs[name]``; ``batch``: another batch size (same data, same weights)."""
    kind, model_name, classes, model_kwargs, build_kwargs = configs[name]
    build_kwargs = dict(build_kwargs, **({"batch": batch} if batch else {}))
    return built(kind, model_name, classes, tuple(sorted(model_kwargs.items())), tuple(sorted(build_kwargs.items())),
                 len(name))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: tiny models on a loaded 2-core machine (both sides run under it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def value_of(model, batch, key):
    feature = batch[key]
    return feature if isinstance(feature, torch.Tensor) else feature[model.dataset.input_processors[key].schema()
                                                                      .index("value")]


def with_long_patient(batch, key):
    """The batch with patient 0's codes of ``key`` tiled to 5x the others' longest, right-padded with 0."""
    rows = [v[v != 0] for v in batch[key]]
    long = 5 * max(len(r) for r in rows[1:])
    rows[0] = rows[0].repeat(-(-long // len(rows[0])))[:long]
    out = torch.zeros(len(rows), long, dtype=batch[key].dtype)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return {**batch, key: out}


def assert_parity(ours, theirs, tol=TOL):
    assert list(ours) == list(theirs)
    for key in theirs:
        ref, got = theirs[key], ours[key]
        assert got.shape == ref.shape, f"{key}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
        assert got.dtype == ref.dtype and got.device == ref.device, key
        assert not got.requires_grad, key
        assert ref.abs().max() > 0 and ref.max() > ref.min(), f"{key}: reference attribution is trivial"
        err = rel_err(got, ref)
        assert err <= tol, f"{key}: relative error {err:.2e}"


def theirs_cls():
    from pyhealth.interpret.methods import DeepLift as PyHealthDeepLift

    return PyHealthDeepLift


def custom_baseline(model, batch):
    """A real code (id 2) for token features, 0.3 for continuous ones; a non-feature key rides along."""
    out = {"label": torch.zeros(3)}
    for key in model.feature_keys:
        value = value_of(model, batch, key)
        token = model.dataset.input_processors[key].is_token()
        out[key] = torch.full_like(value, 2) if token else torch.full_like(value, 0.3)
    return out


def run_both(model, batch, init=None, **call):
    theirs = theirs_cls()(model, **(init or {})).attribute(**call, **batch)
    ours = DeepLift(model, **(init or {})).attribute(**call, **batch)
    return ours, theirs


@pytest.mark.parametrize("name", list(CONFIGS))
def test_default_baseline(name):
    model, batch = case(name)
    assert_parity(*run_both(model, batch))


def test_continuous_values_without_embeddings():
    model, batch = case("mlp-tensor-only")
    assert_parity(*run_both(model, batch, dict(use_embeddings=False)))
    assert_parity(*run_both(model, batch, dict(use_embeddings=False), baseline=custom_baseline(model, batch)))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_custom_baseline(name):
    model, batch = case(name)
    assert_parity(*run_both(model, batch, baseline=custom_baseline(model, batch)))


@pytest.mark.parametrize("name", MULTICLASS)
def test_target_class_idx(name):
    model, batch = case(name)
    assert_parity(*run_both(model, batch, target_class_idx=0))
    assert_parity(*run_both(model, batch, baseline=custom_baseline(model, batch),
                            target_class_idx=np.int64(CONFIGS[name][2] - 1)))


def test_target_class_idx_binary_is_ignored():
    model, batch = case("transformer-2L2H-binary-seq")
    assert_parity(*run_both(model, batch, target_class_idx=1))


@pytest.mark.parametrize("name", ["transformer-2L2H-binary-seq", "transformer-1L1H-multiclass-nested",
                                  "mlp-seq+tensor", "stagenet"])
def test_batch_of_one(name):
    model, batch = case(name, batch=1)
    assert len(batch["patient_id"]) == 1
    assert_parity(*run_both(model, batch))


@pytest.mark.parametrize("name", ["transformer-2L2H-multiclass-seq", "mlp-seq+tensor"])
def test_unequal_lengths(name):
    model, batch = case(name)
    batch = with_long_patient(batch, "conditions")
    lengths = (batch["conditions"] != 0).sum(1)
    assert lengths[0] >= 5 * lengths[1:].max()
    assert_parity(*run_both(model, batch))


def test_call_interface():
    model, batch = case("transformer-2L2H-multiclass-seq")
    assert_parity(DeepLift(model)(**batch), theirs_cls()(model)(**batch))


FAILING = {  # (kind, model, classes, model kwargs, use_embeddings)
    "rnn": ("seq", "RNN", 2, dict(embedding_dim=16, hidden_dim=16), True),
    "transformer-tokens-no-embeddings": ("seq", "Transformer", 3, dict(num_layers=1, heads=2, embedding_dim=16), False),
    "mlp-tokens-no-embeddings": ("mlp", "MLP", 3, dict(embedding_dim=16, hidden_dim=16), False),
}


def raises_like_pyhealth(theirs, ours):
    with pytest.raises(Exception) as pyhealth_error:
        theirs()
    with pytest.raises(pyhealth_error.type):
        ours()


@pytest.mark.parametrize("name", list(FAILING))
def test_same_errors_as_pyhealth(name):
    kind, model_name, classes, model_kwargs, use_embeddings = FAILING[name]
    model, batch = built(kind, model_name, classes, tuple(sorted(model_kwargs.items())), (), len(name))
    try:
        theirs = theirs_cls()(model, use_embeddings=use_embeddings)
    except Exception:
        raises_like_pyhealth(lambda: theirs_cls()(model, use_embeddings=use_embeddings),
                             lambda: DeepLift(model, use_embeddings=use_embeddings))
        return
    ours = DeepLift(model, use_embeddings=use_embeddings)
    raises_like_pyhealth(lambda: theirs.attribute(**batch), lambda: ours.attribute(**batch))


@pytest.mark.parametrize("variant", ["baseline-missing-a-key", "baseline-float-token-ids", "baseline-wrong-batch",
                                     "target-out-of-range"])
def test_bad_call_raises_like_pyhealth(variant):
    model, batch = case("transformer-2L2H-multiclass-seq")
    base = custom_baseline(model, batch)
    if variant == "baseline-missing-a-key":
        del base["procedures"]
    elif variant == "baseline-float-token-ids":
        base["conditions"] = base["conditions"].float()
    elif variant == "baseline-wrong-batch":
        base["conditions"] = base["conditions"][:2]
    call = dict(target_class_idx=7) if variant == "target-out-of-range" else dict(baseline=base)
    raises_like_pyhealth(lambda: theirs_cls()(model).attribute(**call, **batch),
                         lambda: DeepLift(model).attribute(**call, **batch))
