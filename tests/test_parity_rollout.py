"""fastattr's AttentionRollout against the real PyHealth 2.1.0 AttentionRollout.

Same model, same batch (``tests/pyhealth_cases.py``), compared per key as in test_parity_deeplift.py (key sets,
shapes, dtypes, devices; values to ``rel_err <= 1e-4``). Cases: the protocol models PyHealth's rollout supports,
Transformer binary / multiclass / multilabel on flat sequences, binary / multiclass on nested ones (relevance
expanded over each visit's codes), StageAttentionNet on StageNet tuples; 1 to 3 layers, 1 to 4 heads;
``target_class_idx`` (ignored), a batch of one, one patient 5x longer than the rest, the row-pick path against
PyHealth's whole rollout, ``__call__``. Where PyHealth raises, fastattr raises PyHealth's type: models without
the attention methods (MLP, StageNet, RNN: ``TypeError``), ``head_fusion`` other than "mean" (``ValueError``).
"""
import pytest
import torch
from pyhealth_cases import Method, built, case, configs, with_long_patient

from fastattr.interpret.attention import rollout as rollout_module
from fastattr.interpret.attention.rollout import AttentionRollout

pytestmark = pytest.mark.parity

CONFIGS = configs("transformer-2L2H-binary-seq", "transformer-3L4H-multiclass-seq", "transformer-1L1H-multilabel-seq",
                  "transformer-2L2H-binary-nested", "transformer-1L2H-multiclass-nested", "stageattentionnet")
ROLLOUT = Method(AttentionRollout, "AttentionRollout")


def detached(attributions):
    return {k: v.detach() for k, v in attributions.items()}


def run_both(model, batch, **call):
    ours, theirs = ROLLOUT.run_both(model, batch, **call)
    return ours, detached(theirs)


def check(model, batch, **call):
    ROLLOUT.assert_parity(*run_both(model, batch, **call))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_rollout(name):
    model, batch = case(name)
    check(model, batch)


@pytest.mark.parametrize("name", ["transformer-3L4H-multiclass-seq", "stageattentionnet"])
def test_row_picks_match_the_whole_rollout(name, monkeypatch):
    monkeypatch.setattr(rollout_module, "full_path_is_cheaper", lambda *args: False)
    model, batch = case(name)
    check(model, batch)


def test_target_class_idx_is_ignored():
    model, batch = case("transformer-3L4H-multiclass-seq")
    check(model, batch, target_class_idx=2)


@pytest.mark.parametrize("name", ["transformer-2L2H-binary-seq", "transformer-1L2H-multiclass-nested",
                                  "stageattentionnet"])
def test_batch_of_one(name):
    model, batch = case(name, batch=1)
    check(model, batch)


def test_unequal_lengths():
    model, batch = case("transformer-3L4H-multiclass-seq")
    check(model, with_long_patient(batch, "conditions"))


def test_call_interface():
    model, batch = case("transformer-2L2H-binary-seq")
    ROLLOUT.assert_parity(AttentionRollout(model)(**batch), detached(ROLLOUT.theirs()(model)(**batch)))


def test_inside_no_grad_where_pyhealth_raises():
    model, batch = case("transformer-2L2H-binary-seq")
    with torch.no_grad():
        with pytest.raises(RuntimeError):
            ROLLOUT.theirs()(model).attribute(**batch)
        ours = AttentionRollout(model).attribute(**batch)
    ROLLOUT.assert_parity(ours, run_both(model, batch)[1])


@pytest.mark.parametrize(("kind", "model_name", "model_kwargs"), [
    ("mlp", "MLP", dict(embedding_dim=16, hidden_dim=16)),
    ("stagenet", "StageNet", dict(embedding_dim=16, chunk_size=16, levels=2)),
    ("seq", "RNN", dict(embedding_dim=16, hidden_dim=16))])
def test_models_without_attention_are_refused_like_pyhealth(kind, model_name, model_kwargs):
    model, _ = built(kind, model_name, 2, tuple(sorted(model_kwargs.items())), (), 3)
    with pytest.raises(TypeError):
        ROLLOUT.theirs()(model)
    with pytest.raises(TypeError):
        AttentionRollout(model)


def test_head_fusion_is_refused_like_pyhealth():
    model, _ = case("transformer-2L2H-binary-seq")
    with pytest.raises(ValueError):
        ROLLOUT.theirs()(model, head_fusion="max")
    with pytest.raises(ValueError):
        AttentionRollout(model, head_fusion="max")
