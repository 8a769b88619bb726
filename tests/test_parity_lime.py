"""fastattr.LimeExplainer against the real PyHealth 2.1.0 LimeExplainer.

Both classes are built with the same arguments on the same real PyHealth model and called on the same batch
(``tests/pyhealth_cases.py``). Compared per feature key: the key sets, shapes, dtypes and devices exactly, and
the values to a relative error ``rel_err(got, ref) <= 1e-4`` (conftest: the largest |difference| over the
reference's largest |value|); every reference is checked to be non-trivial, except where PyHealth's own answer
is all zeros (its Euclidean kernel underflowing), which fastattr must then give exactly.

Cases: Transformer binary / multiclass / multilabel on flat sequences and binary / multiclass on nested ones,
MLP with token + continuous tensor features and with a tensor feature alone, StageNet and StageAttentionNet on
StageNet (time, value) tuples; each with ``use_embeddings`` True and False. Then every ``feature_selection``
("lasso", "ridge", "none") with every ``distance_mode`` ("cosine", "euclidean"), other ``kernel_width`` and
``alpha``, a custom and a one-row broadcast ``baseline=``, ``target_class_idx`` (int, NumPy, tensor; a no-op for
one logit), other ``random_seed`` values, a batch of one, a batch with one patient 5x longer than the rest, the
batch's keys in another order (PyHealth draws per key in the batch's order but fits them sorted), PyHealth's
defaults (1000 samples) on a batch of two, ``random_seed=None`` (global RNG seeded identically before each side:
same numbers and the same RNG state after), the caller's torch / Python / NumPy RNG states around a seeded
call, ``__call__``, a model whose output depends on its padding with length groups made free; and the same
exception type (or a subclass) wherever PyHealth raises: unknown ``distance_mode`` / ``feature_selection``, RNN
(no Interpretable), a bare ``nn.Module`` (PyHealth's own test), an Interpretable model whose
``forward_from_embedding`` is missing, a Transformer over a continuous tensor feature, a baseline missing a key /
with float token ids / of a wrong batch size, an out-of-range target.

PyHealth's fit is a float32 ``torch.linalg.lstsq`` per patient, but LIME's systems are well conditioned here:
multiplying PyHealth's own per-perturbation model outputs by ``1 + 1e-7 * noise`` moves its attributions by at
most ~1e-6 relative on every case above (n_samples=100; measured while writing these tests), and PyHealth's
two runs of the same call are bit-identical, so the tolerance stays 1e-4 throughout.
"""
import copy
import functools
import random

import numpy as np
import pytest
import torch
from conftest import rel_err

import fastattr

pytestmark = pytest.mark.parity

TOL = 1e-4
SAMPLES = 100
# the Euclidean distance between a patient's embeddings and a perturbation of them is ~1-10: at PyHealth's
# default kernel width (0.25) exp(-d**2 / 0.125) underflows to 0 for every perturbation, so the Euclidean
# cases use a width where the weights are informative (the underflow has its own test)
EUCLIDEAN_WIDTH = 5.0

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
    "mlp-tensor-only": ("tensor_only", "MLP", 2, dict(embedding_dim=16, hidden_dim=16), {}),
    "stagenet": ("stagenet", "StageNet", 3, dict(embedding_dim=16, chunk_size=16, levels=2), dict(batch=3)),
    "stageattentionnet": ("stagenet", "StageAttentionNet", 2, dict(embedding_dim=16, chunk_size=16, levels=2),
                          dict(batch=3)),
}
MULTICLASS = [n for n, c in CONFIGS.items() if c[2] > 2]
SELECTIONS = ["lasso", "ridge", "none"]
DISTANCES = ["cosine", "euclidean"]
# models PyHealth's LimeExplainer refuses: (kind, model, classes, model kwargs, use_embeddings, where it raises)
FAILING = {
    # RNN is no Interpretable: PyHealth refuses it in the constructor whatever use_embeddings
    "rnn-embeddings": ("seq", "RNN", 2, dict(embedding_dim=16, hidden_dim=16), True, "init"),
    "rnn-no-embeddings": ("seq", "RNN", 2, dict(embedding_dim=16, hidden_dim=16), False, "init"),
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
    from pyhealth.interpret.methods import LimeExplainer

    return LimeExplainer


def ours_cls():
    return fastattr.LimeExplainer


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


def assert_parity(ours, theirs, trivial_ok=False):
    assert set(ours) == set(theirs)
    for key in theirs:
        ref, got = theirs[key], ours[key]
        assert isinstance(got, torch.Tensor), key
        assert got.shape == ref.shape, f"{key}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
        assert got.dtype == ref.dtype, f"{key}: dtype {got.dtype} != {ref.dtype}"
        assert got.device == ref.device, key
        assert not got.requires_grad, key
        if trivial_ok and not ref.abs().max() > 0:
            assert torch.equal(got, ref), f"{key}: PyHealth gives all zeros, fastattr max |value| {got.abs().max()}"
            continue
        assert ref.abs().max() > 0 and ref.max() > ref.min(), f"{key}: reference attribution is trivial"
        err = rel_err(got, ref)
        assert err <= TOL, f"{key}: relative error {err:.2e}"


def run_both(model, batch, init=None, **call):
    """Attribute with both classes (same constructor args ``init``, same call args); return (ours, theirs)."""
    init = dict(dict(n_samples=SAMPLES), **(init or {}))
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


@pytest.mark.parametrize("distance_mode", DISTANCES)
@pytest.mark.parametrize("feature_selection", SELECTIONS)
@pytest.mark.parametrize("name", ["transformer-2L2H-multiclass-seq", "mlp-seq+tensor", "stageattentionnet"])
def test_feature_selection_and_distance(name, feature_selection, distance_mode):
    model, batch = case(name)
    init = dict(feature_selection=feature_selection, distance_mode=distance_mode)
    if distance_mode == "euclidean":
        init["kernel_width"] = EUCLIDEAN_WIDTH
    assert_parity(*run_both(model, batch, init))


@pytest.mark.parametrize("use_embeddings", [True, False], ids=["embeddings", "no-embeddings"])
@pytest.mark.parametrize("options", [dict(kernel_width=0.7, alpha=0.5), dict(kernel_width=0.1, alpha=0.0),
                                     dict(feature_selection="ridge", kernel_width=0.4, alpha=2.0),
                                     dict(distance_mode="euclidean", kernel_width=2.5, alpha=0.1)],
                         ids=["wide-strong", "narrow-unregularised", "ridge-alpha2", "euclidean-2.5"])
def test_kernel_width_and_alpha(options, use_embeddings):
    model, batch = case("transformer-1L2H-multilabel-seq")
    assert_parity(*run_both(model, batch, dict(options, use_embeddings=use_embeddings)))


@pytest.mark.parametrize("use_embeddings", [True, False], ids=["embeddings", "no-embeddings"])
@pytest.mark.parametrize("feature_selection", SELECTIONS)
def test_euclidean_at_the_default_width(feature_selection, use_embeddings):
    """PyHealth's default kernel width with Euclidean distances: over embeddings every weight underflows to 0
    (PyHealth answers all zeros); over raw token ids most do (tiny, but informative, attributions)."""
    model, batch = case("transformer-2L2H-multiclass-seq")
    init = dict(distance_mode="euclidean", feature_selection=feature_selection, use_embeddings=use_embeddings)
    assert_parity(*run_both(model, batch, init), trivial_ok=use_embeddings)


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
    """One patient 5x longer than the rest (~50 features in the 5x case: 200 perturbations, so that even the
    unregularised fit would be determined)."""
    model, batch = case(name)
    batch = with_long_patient(batch, "conditions", *((10, 2) if shape == "10-vs-2" else ()))
    lengths = (batch["conditions"] != 0).sum(1)
    assert lengths[0] >= 5 * lengths[1:].max()
    assert_parity(*run_both(model, batch, dict(use_embeddings=use_embeddings, n_samples=200)))


@pytest.mark.parametrize("name", ["transformer-2L2H-multiclass-seq", "transformer-2L2H-binary-nested", "stagenet"])
def test_keys_in_another_order(name):
    """PyHealth draws each perturbation's gates per key in the batch's key order, then fits the keys sorted:
    reordering the batch's keys changes its answer, and fastattr's with it."""
    model, batch = case(name)
    reordered = dict(reversed(list(batch.items())))
    ours, theirs = run_both(model, reordered)
    assert_parity(ours, theirs)
    _, in_order = run_both(model, batch)
    assert any(rel_err(in_order[k], theirs[k]) > TOL for k in theirs), "key order made no difference"


def test_pyhealth_defaults():
    # n_samples=1000, kernel_width=0.25, distance_mode="cosine", feature_selection="lasso", alpha=0.01, seed 42
    model, batch = case("transformer-1L1H-binary-seq", batch=2)
    theirs = theirs_cls()(model)
    ours = ours_cls()(model)
    for attr in ("use_embeddings", "n_samples", "kernel_width", "distance_mode", "feature_selection", "alpha",
                 "random_seed"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert_parity(ours.attribute(**batch), theirs.attribute(**batch))


@pytest.mark.parametrize("name", ["transformer-2L2H-multiclass-seq", "stagenet"])
def test_unseeded_uses_global_rng_like_pyhealth(name):
    """random_seed=None: perturbations come from the caller's global RNG; same seed, same draws, same state after."""
    model, batch = case(name)
    init = dict(random_seed=None, n_samples=SAMPLES)
    torch.manual_seed(1234)
    theirs = theirs_cls()(model, **init).attribute(**batch)
    theirs_after = torch.get_rng_state()
    torch.manual_seed(1234)
    ours = ours_cls()(model, **init).attribute(**batch)
    ours_after = torch.get_rng_state()
    assert_parity(ours, theirs)
    assert torch.equal(ours_after, theirs_after), "global RNG advanced differently from PyHealth's call"
    # and the seed really matters: another global seed gives other perturbations
    torch.manual_seed(4321)
    other = ours_cls()(model, **init).attribute(**batch)
    assert any(rel_err(other[k], theirs[k]) > TOL for k in theirs)


@pytest.mark.parametrize("cls", ["ours", "theirs"])
def test_seeded_call_leaves_global_rng_unchanged(cls):
    model, batch = case("transformer-1L1H-binary-seq")
    explainer = (ours_cls() if cls == "ours" else theirs_cls())(model, n_samples=SAMPLES, random_seed=7)
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
    theirs = theirs_cls()(model, n_samples=SAMPLES)(target_class_idx=2, **batch)
    ours = ours_cls()(model, n_samples=SAMPLES)(target_class_idx=2, **batch)
    assert_parity(ours, theirs)


def mask_blind(model):
    """``model`` (a PyHealth Transformer on StageNet tuples) made to drop the masks PyHealth's LIME appends
    to (time, value) features, so that it infers them from the embedded values as PyHealth's Transformer does
    when none is given: a padded vitals row embeds to the Linear's bias and is attended, so the output depends
    on padding (a gate on a padded position too), the case a trimmed or merged row would get wrong."""
    class MaskBlind(type(model)):
        def _without_masks(self, kwargs):
            return {k: v[:2] if k in self.feature_keys and isinstance(v, tuple) and len(v) == 3 else v
                    for k, v in kwargs.items()}

        def forward(self, **kwargs):
            return super().forward(**self._without_masks(kwargs))

        def forward_from_embedding(self, **kwargs):
            return super().forward_from_embedding(**self._without_masks(kwargs))

    blind = copy.deepcopy(model)
    blind.__class__ = MaskBlind
    return blind


def with_masks(model, batch):
    """``batch`` with the masks PyHealth's LIME appends to features whose processor gives none."""
    out = dict(batch)
    for key in model.feature_keys:
        processor = model.dataset.input_processors[key]
        if "mask" in processor.schema():
            continue
        parts = (batch[key],) if isinstance(batch[key], torch.Tensor) else tuple(batch[key])
        value = parts[processor.schema().index("value")]
        mask = (value != 0) if processor.is_token() or value.dim() < 3 else (value.abs().sum(-1) != 0)
        out[key] = (*parts, mask.int())
    return out


def padded_further(model, batch, extra=2):
    """``batch`` with every feature's tensors zero-padded by ``extra`` more positions along dim 1."""
    def pad(t):
        return torch.cat([t, t.new_zeros(t.shape[0], extra, *t.shape[2:])], dim=1) if t.dim() >= 2 else t

    out = dict(batch)
    for key in model.feature_keys:
        out[key] = pad(batch[key]) if isinstance(batch[key], torch.Tensor) else tuple(pad(t) for t in batch[key])
    return out


@pytest.mark.parametrize("name", ["mask-blind-transformer", "stagenet", "transformer-2L2H-multiclass-seq"])
def test_length_groups_keep_parity_on_padding(name, monkeypatch):
    """Length groups made free, so fastattr trims and merges rows wherever its padding checks allow. The
    mask-blind Transformer's output, as LIME calls it (masks appended), depends on its padding (shown here with
    PyHealth's forward): it must run padded with every gate kept. StageNet and PyHealth's Transformer use the
    appended masks and ignore padding. Either way PyHealth's numbers, equal to fastattr's padded run."""
    from fastattr.core import packing

    monkeypatch.setitem(packing.GROUP_COST["perturbation"], "cpu", 0.0)
    if name == "mask-blind-transformer":
        model, batch = built("stagenet", "Transformer", 3, (("embedding_dim", 16), ("heads", 2), ("num_layers", 1)),
                             (("batch", 4),), 21)
        model = mask_blind(model)
    else:
        model, batch = case(name)
    masked = with_masks(model, batch)
    with torch.no_grad():
        moved = (model(**masked)["logit"] - model(**padded_further(model, masked))["logit"]).abs().max().item()
    assert (moved > 1e-4) == (name == "mask-blind-transformer"), f"padding moves the logits by {moved:.1e}"
    for use_embeddings in (True, False):
        init = dict(n_samples=SAMPLES, use_embeddings=use_embeddings)
        theirs = theirs_cls()(model, **init).attribute(**batch)
        lime = ours_cls()(model, **init)
        assert_parity(lime.attribute(**batch), theirs)
        merged = lime.runner.merged_padding
        assert_parity(lime.attribute(pack_lengths=False, **batch), theirs)
        print(name, use_embeddings, "merged padding:", merged, "rows:", lime.runner.last_rows)
        if name == "mask-blind-transformer":
            assert not merged


def test_unknown_options_raise_like_pyhealth():
    model, _ = case("transformer-1L1H-binary-seq")
    for options in (dict(distance_mode="manhattan"), dict(feature_selection="elasticnet")):
        with pytest.raises(Exception) as pyhealth_error:
            theirs_cls()(model, **options)
        with pytest.raises(pyhealth_error.type):
            ours_cls()(model, **options)


def without_forward_from_embedding(model):
    """A copy of ``model`` (still an Interpretable) on which ``forward_from_embedding`` is missing."""
    class Hidden(type(model)):
        def __getattribute__(self, attr):
            if attr == "forward_from_embedding":
                raise AttributeError(attr)
            return super().__getattribute__(attr)

    hidden = copy.deepcopy(model)
    hidden.__class__ = Hidden
    return hidden


class BareModule(torch.nn.Module):
    """PyHealth's own test of the refusal: an ``nn.Module`` with feature keys and no protocol at all."""

    def __init__(self):
        super().__init__()
        self.feature_keys, self.label_keys = ["x"], ["y"]
        self.linear = torch.nn.Linear(3, 1)


@pytest.mark.parametrize("use_embeddings", [True, False], ids=["embeddings", "no-embeddings"])
@pytest.mark.parametrize("variant", ["bare-module", "interpretable-without-forward-from-embedding"])
def test_models_without_the_protocol_raise_like_pyhealth(variant, use_embeddings):
    """The Interpretable check comes first in PyHealth (ValueError), then its assert on
    ``forward_from_embedding`` (AssertionError) when ``use_embeddings``."""
    if variant == "bare-module":
        model = BareModule()
    else:
        model = without_forward_from_embedding(case("transformer-1L1H-binary-seq")[0])
        assert not hasattr(model, "forward_from_embedding")
    try:
        theirs_cls()(model, use_embeddings=use_embeddings)
    except Exception as pyhealth_error:
        with pytest.raises(type(pyhealth_error)):
            ours_cls()(model, use_embeddings=use_embeddings)
    else:  # PyHealth accepts an Interpretable without forward_from_embedding when use_embeddings=False
        ours_cls()(model, use_embeddings=False)  # so does fastattr (this model's own forward needs the method)
        model_ok, batch = case("transformer-1L1H-binary-seq")
        init = dict(use_embeddings=False, n_samples=SAMPLES)
        ours = ours_cls()(model_ok, **init).attribute(**batch)
        assert_parity(ours, theirs_cls()(model_ok, **init).attribute(**batch))


@pytest.mark.parametrize("name", list(FAILING))
def test_same_errors_as_pyhealth(name):
    """Where PyHealth raises (in the constructor or in attribute), fastattr raises there too, an exception of
    PyHealth's type (or a subclass)."""
    kind, model_name, classes, model_kwargs, use_embeddings, where = FAILING[name]
    model, batch = built(kind, model_name, classes, tuple(sorted(model_kwargs.items())), (), len(name))
    init = dict(use_embeddings=use_embeddings, n_samples=8)
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
    init = dict(use_embeddings=use_embeddings, n_samples=8)
    with pytest.raises(Exception) as pyhealth_error:
        theirs_cls()(model, **init).attribute(**call, **batch)
    with pytest.raises(pyhealth_error.type):
        ours_cls()(model, **init).attribute(**call, **batch)
