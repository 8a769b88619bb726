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
of range. test_parity_random_baseline.py takes this module's ``CONFIGS`` and (from ``tests/pyhealth_cases.py``)
its builders from here.
"""
import numpy as np
import pytest
from conftest import raises_like_pyhealth
from pyhealth_cases import (
    BAD_CALLS,
    CASES,
    MULTICLASS,
    PROTOCOL,
    Method,
    bad_call,
    built,  # noqa: F401  (test_parity_random_baseline imports it from here)
    case,
    configs,
    custom_baseline,
    named,
    with_long_patient,
)

from fastattr.interpret.gradient.deeplift import DeepLift

pytestmark = [pytest.mark.parity, pytest.mark.usefixtures("one_thread")]

# the protocol models, with a two-layer binary Transformer for the one-layer one
CONFIGS = configs("transformer-2L2H-binary-seq", *(n for n in PROTOCOL if n != "transformer-1L1H-binary-seq"))
DEEPLIFT = Method(DeepLift, "DeepLift")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_default_baseline(name):
    DEEPLIFT.check(*case(name))


def test_continuous_values_without_embeddings():
    model, batch = case("mlp-tensor-only")
    DEEPLIFT.check(model, batch, dict(use_embeddings=False))
    DEEPLIFT.check(model, batch, dict(use_embeddings=False), baseline=custom_baseline(model, batch))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_custom_baseline(name):
    model, batch = case(name)
    DEEPLIFT.check(model, batch, baseline=custom_baseline(model, batch))


@pytest.mark.parametrize("name", MULTICLASS)
def test_target_class_idx(name):
    model, batch = case(name)
    DEEPLIFT.check(model, batch, target_class_idx=0)
    DEEPLIFT.check(model, batch, baseline=custom_baseline(model, batch), target_class_idx=np.int64(CASES[name][2] - 1))


def test_target_class_idx_binary_is_ignored():
    DEEPLIFT.check(*case("transformer-2L2H-binary-seq"), target_class_idx=1)


@pytest.mark.parametrize("name", ["transformer-2L2H-binary-seq", "transformer-1L1H-multiclass-nested",
                                  "mlp-seq+tensor", "stagenet"])
def test_batch_of_one(name):
    model, batch = case(name, batch=1)
    assert len(batch["patient_id"]) == 1
    DEEPLIFT.check(model, batch)


@pytest.mark.parametrize("name", ["transformer-2L2H-multiclass-seq", "mlp-seq+tensor"])
def test_unequal_lengths(name):
    model, batch = case(name)
    batch = with_long_patient(batch, "conditions")
    lengths = (batch["conditions"] != 0).sum(1)
    assert lengths[0] >= 5 * lengths[1:].max()
    DEEPLIFT.check(model, batch)


def test_call_interface():
    model, batch = case("transformer-2L2H-multiclass-seq")
    DEEPLIFT.assert_parity(DeepLift(model)(**batch), DEEPLIFT.theirs()(model)(**batch))


FAILING = {  # (kind, model, classes, model kwargs, use_embeddings)
    "rnn": ("seq", "RNN", 2, dict(embedding_dim=16, hidden_dim=16), True),
    "transformer-tokens-no-embeddings": ("seq", "Transformer", 3, dict(num_layers=1, heads=2, embedding_dim=16), False),
    "mlp-tokens-no-embeddings": ("mlp", "MLP", 3, dict(embedding_dim=16, hidden_dim=16), False),
}


@pytest.mark.parametrize("name", list(FAILING))
def test_same_errors_as_pyhealth(name):
    kind, model_name, classes, model_kwargs, use_embeddings = FAILING[name]
    model, batch = named(name, kind, model_name, classes, model_kwargs)
    try:
        theirs = DEEPLIFT.theirs()(model, use_embeddings=use_embeddings)
    except Exception:
        raises_like_pyhealth(lambda: DEEPLIFT.theirs()(model, use_embeddings=use_embeddings),
                             lambda: DeepLift(model, use_embeddings=use_embeddings))
        return
    ours = DeepLift(model, use_embeddings=use_embeddings)
    raises_like_pyhealth(lambda: theirs.attribute(**batch), lambda: ours.attribute(**batch))


@pytest.mark.parametrize("variant", BAD_CALLS)
def test_bad_call_raises_like_pyhealth(variant):
    model, batch = case("transformer-2L2H-multiclass-seq")
    call = bad_call(variant, model, batch)
    raises_like_pyhealth(lambda: DEEPLIFT.theirs()(model).attribute(**call, **batch),
                         lambda: DeepLift(model).attribute(**call, **batch))
