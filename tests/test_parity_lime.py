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

import pytest
import torch
from conftest import raises_like_pyhealth, rel_err
from pyhealth_cases import SAMPLER_CHECKS, TOL, USE_EMBEDDINGS, Sampler, built, case, with_long_patient

import fastattr

pytestmark = [pytest.mark.parity, pytest.mark.usefixtures("one_thread")]

SAMPLES = 100
# the Euclidean distance between a patient's embeddings and a perturbation of them is ~1-10: at PyHealth's
# default kernel width (0.25) exp(-d**2 / 0.125) underflows to 0 for every perturbation, so the Euclidean
# cases use a width where the weights are informative (the underflow has its own test)
EUCLIDEAN_WIDTH = 5.0
SELECTIONS = ["lasso", "ridge", "none"]
DISTANCES = ["cosine", "euclidean"]
LIME = Sampler(fastattr.LimeExplainer, "LimeExplainer", dict(n_samples=SAMPLES), quick=dict(n_samples=8),
               settings=("use_embeddings", "n_samples", "kernel_width", "distance_mode", "feature_selection", "alpha",
                         "random_seed"),
               # RNN is no Interpretable: PyHealth refuses it in the constructor whatever use_embeddings
               refused_at_init=frozenset({"rnn-embeddings", "rnn-no-embeddings"}))


# the checks LIME shares with SHAP, collected here too and run on this module's ``method``
globals().update(SAMPLER_CHECKS)


@pytest.fixture(scope="module")
def method():
    return LIME


@pytest.mark.parametrize("distance_mode", DISTANCES)
@pytest.mark.parametrize("feature_selection", SELECTIONS)
@pytest.mark.parametrize("name", ["transformer-2L2H-multiclass-seq", "mlp-seq+tensor", "stageattentionnet"])
def test_feature_selection_and_distance(name, feature_selection, distance_mode):
    init = dict(feature_selection=feature_selection, distance_mode=distance_mode)
    if distance_mode == "euclidean":
        init["kernel_width"] = EUCLIDEAN_WIDTH
    LIME.check(*case(name), init)


@USE_EMBEDDINGS
@pytest.mark.parametrize("options", [dict(kernel_width=0.7, alpha=0.5), dict(kernel_width=0.1, alpha=0.0),
                                     dict(feature_selection="ridge", kernel_width=0.4, alpha=2.0),
                                     dict(distance_mode="euclidean", kernel_width=2.5, alpha=0.1)],
                         ids=["wide-strong", "narrow-unregularised", "ridge-alpha2", "euclidean-2.5"])
def test_kernel_width_and_alpha(options, use_embeddings):
    LIME.check(*case("transformer-1L2H-multilabel-seq"), dict(options, use_embeddings=use_embeddings))


@USE_EMBEDDINGS
@pytest.mark.parametrize("feature_selection", SELECTIONS)
def test_euclidean_at_the_default_width(feature_selection, use_embeddings):
    """PyHealth's default kernel width with Euclidean distances: over embeddings every weight underflows to 0
    (PyHealth answers all zeros); over raw token ids most do (tiny, but informative, attributions)."""
    model, batch = case("transformer-2L2H-multiclass-seq")
    init = dict(distance_mode="euclidean", feature_selection=feature_selection, use_embeddings=use_embeddings)
    LIME.assert_parity(*LIME.run_both(model, batch, init), trivial_ok=use_embeddings)


@USE_EMBEDDINGS
@pytest.mark.parametrize("name", ["transformer-2L2H-multiclass-seq", "mlp-seq+tensor"])
@pytest.mark.parametrize("shape", ["10-vs-2", "5x"])
def test_unequal_lengths(name, use_embeddings, shape):
    """One patient 5x longer than the rest (~50 features in the 5x case: 200 perturbations, so that even the
    unregularised fit would be determined)."""
    model, batch = case(name)
    batch = with_long_patient(batch, "conditions", *((10, 2) if shape == "10-vs-2" else ()))
    lengths = (batch["conditions"] != 0).sum(1)
    assert lengths[0] >= 5 * lengths[1:].max()
    LIME.check(model, batch, dict(use_embeddings=use_embeddings, n_samples=200))


@pytest.mark.parametrize("name", ["transformer-2L2H-multiclass-seq", "transformer-2L2H-binary-nested", "stagenet"])
def test_keys_in_another_order(name):
    """PyHealth draws each perturbation's gates per key in the batch's key order, then fits the keys sorted:
    reordering the batch's keys changes its answer, and fastattr's with it."""
    model, batch = case(name)
    reordered = dict(reversed(list(batch.items())))
    ours, theirs = LIME.run_both(model, reordered)
    LIME.assert_parity(ours, theirs)
    _, in_order = LIME.run_both(model, batch)
    assert any(rel_err(in_order[k], theirs[k]) > TOL for k in theirs), "key order made no difference"


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
        theirs = LIME.theirs()(model, **init).attribute(**batch)
        lime = LIME.ours(model, **init)
        LIME.assert_parity(lime.attribute(**batch), theirs)
        merged = lime.runner.merged_padding
        LIME.assert_parity(lime.attribute(pack_lengths=False, **batch), theirs)
        print(name, use_embeddings, "merged padding:", merged, "rows:", lime.runner.last_rows)
        if name == "mask-blind-transformer":
            assert not merged


def test_unknown_options_raise_like_pyhealth():
    model, _ = case("transformer-1L1H-binary-seq")
    for options in (dict(distance_mode="manhattan"), dict(feature_selection="elasticnet")):
        raises_like_pyhealth(lambda: LIME.theirs()(model, **options), lambda: LIME.ours(model, **options))


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


@USE_EMBEDDINGS
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
        LIME.theirs()(model, use_embeddings=use_embeddings)
    except Exception as pyhealth_error:
        with pytest.raises(type(pyhealth_error)):
            LIME.ours(model, use_embeddings=use_embeddings)
    else:  # PyHealth accepts an Interpretable without forward_from_embedding when use_embeddings=False
        LIME.ours(model, use_embeddings=False)  # so does fastattr (this model's own forward needs the method)
        LIME.check(*case("transformer-1L1H-binary-seq"), dict(use_embeddings=False, n_samples=SAMPLES))
