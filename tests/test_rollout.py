"""fastattr's AttentionRollout against the plain oracle (fastattr.loop.rollout.loop_rollout: one hooked forward,
the whole rollout matrix, the model's reduction) on fastattr's own Transformer: padding at odd lengths, one
feature, nested visits, a batch of one, the row-pick path, 3-D maps, inside ``torch.no_grad()``; and
PyHealth's exception types for bad options."""
import pytest
import torch
from conftest import codes, own_model, rel_err
from torch import nn

from fastattr.demo.models import FeatureProcessor, FeatureSpec, TransformerClassifier
from fastattr.interpret.attention import rollout as rollout_module
from fastattr.interpret.attention.rollout import AttentionRollout
from fastattr.loop.rollout import loop_rollout

TOL = 1e-5


def check(model, batch, interpreter=None, **options):
    got = (interpreter or AttentionRollout(model)).attribute(**options, **batch)
    ref = loop_rollout(model, **batch)
    assert sorted(got) == sorted(ref)
    for key in ref:
        assert got[key].shape == ref[key].shape and got[key].dtype == ref[key].dtype
        assert rel_err(got[key], ref[key]) <= TOL, (key, rel_err(got[key], ref[key]))
    return got


def one_feature_model(seed=3, layers=3, heads=2):
    spec = FeatureSpec({"codes": FeatureProcessor(token=True, size=31)})
    torch.manual_seed(seed)
    return TransformerClassifier(spec, num_classes=3, dim=8, heads=heads, layers=layers).eval()


@pytest.mark.parametrize("classes", [2, 3])
def test_matches_the_oracle(classes):
    model, batch = own_model("transformer", num_classes=classes, seed=classes)
    got = check(model, batch)
    scores = got["codes"]  # the CLS row of a row-stochastic product, the CLS column left out
    assert bool((scores >= 0).all()) and bool((scores.sum(-1) <= 1 + 1e-6).all())
    assert bool((got["codes"][batch["codes"] == 0] == 0).all())  # padding gets nothing


def test_one_feature_odd_lengths_and_a_batch_of_one():
    model = one_feature_model()
    batch = {"codes": codes(5, 17, 31, torch.Generator().manual_seed(3))}
    check(model, batch)
    check(model, {"codes": batch["codes"][3:4, :9]})


def test_nested_visits_are_expanded_to_the_codes():
    model = one_feature_model(seed=4, layers=2, heads=1)
    g = torch.Generator().manual_seed(4)
    visits = torch.stack([codes(3, 4, 31, g) for _ in range(6)], dim=1)
    visits[2, 4:] = 0
    got = check(model, {"codes": visits})
    assert got["codes"].shape == visits.shape


def test_row_picks_give_the_same_rows(monkeypatch):
    """Where the whole rollout is the dearer path, the CLS row is pushed from the last layer to the first: the
    model's reduction then only sees the row-pick probes, never a formed rollout."""
    monkeypatch.setattr(rollout_module, "full_path_is_cheaper", lambda *args: False)
    model, batch = own_model("transformer", num_classes=3, seed=5)
    interpreter = AttentionRollout(model)
    seen = []
    reduce = model.get_relevance_tensor
    model.get_relevance_tensor = lambda R, **b: seen.extend(  # a formed rollout's rows sum to 1, a probe's do not
        not torch.allclose(r.sum(-1), torch.ones(())) for r in R.values()) or reduce(R, **b)
    first = interpreter.attribute(**batch)
    again = interpreter.attribute(**batch)  # a known layout: the index-coded probe only
    assert seen and all(seen)
    model.get_relevance_tensor = reduce
    for got in (first, again):
        ref = loop_rollout(model, **batch)
        assert all(rel_err(got[k], ref[k]) <= TOL for k in ref)


def test_single_head_maps_and_no_grad():
    model, batch = own_model("transformer", num_classes=3, seed=6)
    ref = AttentionRollout(model).attribute(**batch)
    layers = model.get_attention_layers
    model.get_attention_layers = lambda: {k: [(a.mean(1), g) for a, g in pairs] for k, pairs in layers().items()}
    with torch.no_grad():
        got = AttentionRollout(model).attribute(**batch)
    assert all(rel_err(got[k], ref[k]) <= TOL for k in ref)


def test_the_class_is_ignored_and_hooks_are_turned_off():
    model, batch = own_model("transformer", num_classes=3, seed=7)
    interpreter = AttentionRollout(model)
    first = interpreter.attribute(**batch)
    again = interpreter.attribute(target_class_idx=99, **batch)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert model._capture is False
    with pytest.raises(KeyError):
        interpreter.attribute(**{"codes": batch["codes"]})  # the model wants every feature key
    assert model._capture is False


def test_bad_options():
    model, _ = own_model("transformer", seed=8)
    with pytest.raises(ValueError, match="head_fusion"):
        AttentionRollout(model, head_fusion="max")

    class Plain(nn.Module):
        def forward(self, **data):
            return {"logit": torch.zeros(1, 1)}

    with pytest.raises(TypeError, match="get_attention_layers"):
        AttentionRollout(Plain())
