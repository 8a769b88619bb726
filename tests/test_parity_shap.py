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
import pytest
from pyhealth_cases import SAMPLER_CHECKS, USE_EMBEDDINGS, Sampler, case, with_long_patient

import fastattr

pytestmark = [pytest.mark.parity, pytest.mark.usefixtures("one_thread")]

COALITIONS = 128
# a "mlp-tensor-only" batch has 5 features in all: 2**5 = 32 < max_coalitions, so PyHealth samples only 32
SHAP = Sampler(fastattr.ShapExplainer, "ShapExplainer", dict(max_coalitions=COALITIONS), quick=dict(max_coalitions=8),
               settings=("use_embeddings", "n_background_samples", "max_coalitions", "regularization", "random_seed"),
               # RNN: use_embeddings=True is refused in the constructor; without embeddings its forward reads
               # the label, which SHAP filters out of the batch
               refused_at_init=frozenset({"rnn-embeddings"}))


# the checks SHAP shares with LIME, collected here too and run on this module's ``method``
globals().update(SAMPLER_CHECKS)


@pytest.fixture(scope="module")
def method():
    return SHAP


@pytest.mark.parametrize("name", ["transformer-2L2H-multiclass-seq", "mlp-seq+tensor"])
def test_regularization(name):
    SHAP.check(*case(name), dict(regularization=1e-2))


@USE_EMBEDDINGS
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
    ours, theirs = SHAP.run_both(model, batch, dict(use_embeddings=use_embeddings, max_coalitions=256))
    SHAP.assert_parity(ours, theirs)
    row = theirs["conditions"][0]
    spread = float((row.max() - row.min()) / row.abs().max())
    assert spread > 0.1 if shape == "10-vs-2" else spread < 1e-3, spread
