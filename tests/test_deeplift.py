"""fastattr's DeepLift against the plain oracle (fastattr.loop.deeplift.loop_deeplift: PyHealth 2.1.0's three
forwards and full backward, the Rescale rule applied by forward hooks instead of swapped modules) on
fastattr's own models with ReLU / Sigmoid / Tanh modules: padding at odd lengths, one feature, a batch of
one, both embedding modes, custom baselines, explicit and near-tied classes; the model left as it was; and
PyHealth's exception types for bad input."""
import pytest
import torch
from conftest import codes, own_model, rel_err
from torch import nn

from fastattr.demo.models import FeatureProcessor, FeatureSpec, MLPClassifier, TransformerClassifier
from fastattr.interpret.gradient.deeplift import DeepLift, DeepLiftInputError
from fastattr.interpret.gradient.deeplift_rules import RescaleSwap
from fastattr.loop.deeplift import loop_deeplift

TOL = 1e-5


def with_activation(model, activation):
    """``model`` with its feed-forward activations replaced by ``activation`` modules (the Transformer's
    GELU, the MLP's ReLU), so the Rescale rule has something to rescale."""
    if isinstance(model, TransformerClassifier):
        for blocks in model.encoders.values():
            for block in blocks:
                block.mlp[1] = activation()
    else:
        model.mlp[1] = activation()
    return model


def padded_labs(batch, generator):
    """The batch's labs with trailing all-zero steps (padding) for all but the first sample."""
    labs = batch["labs"].clone()
    for i in range(1, labs.shape[0]):
        labs[i, int(torch.randint(1, labs.shape[1] + 1, (1,), generator=generator)):] = 0
    return {**batch, "labs": labs}


def check(model, batch, tol=TOL, **options):
    use = options.pop("use_embeddings", True)
    got = DeepLift(model, use_embeddings=use).attribute(**options, **batch)
    ref = loop_deeplift(model, use_embeddings=use, **options, **batch)
    assert list(got) == sorted(ref)
    for key in ref:
        assert got[key].shape == ref[key].shape and got[key].dtype == ref[key].dtype
        assert ref[key].abs().max() > 0
        assert rel_err(got[key], ref[key]) <= tol, (key, rel_err(got[key], ref[key]))
    return got


@pytest.mark.parametrize(("kind", "activation", "classes"), [
    ("transformer", nn.Tanh, 3), ("transformer", nn.ReLU, 2), ("transformer", nn.Sigmoid, 3),
    ("mlp", nn.ReLU, 3), ("mlp", nn.Sigmoid, 2), ("mlp", nn.Tanh, 2)])
def test_matches_the_oracle(kind, activation, classes):
    model, batch = own_model(kind, num_classes=classes, seed=classes)
    batch = padded_labs(batch, torch.Generator().manual_seed(classes))
    check(with_activation(model, activation), batch)


def test_rescale_rule_is_applied():
    """Under the Rescale rule the attributions differ from plain gradient x delta and still sum to
    f(x) - f(b) per sample."""
    model, batch = own_model("mlp", num_classes=3, seed=4)
    got = check(model, batch, target_class_idx=2)
    with torch.no_grad():
        ref = {k: torch.ones_like(v) if k == "codes" else torch.zeros_like(v) + 0.01 for k, v in batch.items()
               if k in model.feature_keys}
        full = model.forward(codes=batch["codes"], labs=batch["labs"])["logit"][:, 2]
        base = model.forward_from_embedding(**{k: (model.embedding_model({k: v})[k], (batch[k] != 0).int() if k ==
                                                   "codes" else (batch[k].abs().sum(-1) != 0).int())
                                                for k, v in ref.items()})["logit"][:, 2]
    total = got["codes"].sum(1) + got["labs"].sum((1, 2))
    assert torch.allclose(total, full - base, rtol=1e-4, atol=1e-5)


def test_one_feature_odd_lengths_and_a_batch_of_one():
    g = torch.Generator().manual_seed(7)
    spec = FeatureSpec({"codes": FeatureProcessor(token=True, size=23)})
    torch.manual_seed(7)
    model = with_activation(TransformerClassifier(spec, num_classes=3, dim=8, heads=2, layers=2).eval(), nn.Tanh)
    batch = {"codes": codes(5, 13, 23, g)}
    check(model, batch)
    check(model, {"codes": batch["codes"][2:3, :7]})


def test_nested_codes():
    g = torch.Generator().manual_seed(8)
    spec = FeatureSpec({"visits": FeatureProcessor(token=True, size=19)})
    torch.manual_seed(8)
    model = with_activation(TransformerClassifier(spec, num_classes=2, dim=8, heads=1, layers=1).eval(), nn.ReLU)
    visits = torch.stack([codes(3, 4, 19, g) for _ in range(5)], dim=1)  # [3, 5 visits, 4 codes]
    visits[1, 3:] = 0
    got = check(model, {"visits": visits})
    assert got["visits"].shape == visits.shape


def test_continuous_values_without_embeddings_and_custom_baselines():
    spec = FeatureSpec({"labs": FeatureProcessor(token=False, size=5)})
    torch.manual_seed(9)
    model = with_activation(MLPClassifier(spec, num_classes=3, dim=8, hidden=12).eval(), nn.Sigmoid)
    labs = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(9))
    check(model, {"labs": labs}, use_embeddings=False)
    check(model, {"labs": labs}, use_embeddings=False, baseline={"labs": torch.randn(4, 3, 5)})
    model, batch = own_model("mlp", num_classes=3, seed=10)
    baseline = {"codes": torch.randint(2, 40, batch["codes"].shape), "labs": torch.randn(batch["labs"].shape)}
    check(model, batch, baseline=baseline)
    check(model, batch, baseline=baseline, target_class_idx=1)


def test_a_tie_takes_the_class_from_the_batch_as_given():
    """Equal logits (two identical rows of the head): the class comes from a no-grad forward of the batch, as
    PyHealth takes it; without a tie no such forward runs."""
    model, batch = own_model("mlp", num_classes=3, seed=11)
    calls = []
    forward = model.forward
    model.forward = lambda **b: calls.append(1) or forward(**b)
    dl = DeepLift(model)
    dl.attribute(**batch)
    assert not calls
    model.mlp[2].weight.data[1] = model.mlp[2].weight.data[2]
    model.mlp[2].bias.data[1] = model.mlp[2].bias.data[2]
    dl.attribute(**batch)
    assert len(calls) == 1
    with torch.no_grad():
        expected = forward(**batch)["logit"].argmax(-1)
    assert torch.equal(dl.last_predictions[1], expected)
    model.forward = forward
    check(model, batch)


def test_the_model_is_left_as_it_was():
    model, batch = own_model("mlp", num_classes=3, seed=12)
    relu = model.mlp[1]
    DeepLift(model).attribute(**batch)
    assert model.mlp[1] is relu
    assert all(p.grad is None for p in model.parameters())  # the backward went to the inputs only
    with pytest.raises(DeepLiftInputError):
        DeepLift(model).attribute(target_class_idx=7, **batch)
    assert model.mlp[1] is relu


def test_rescale_swap_restores_shared_and_nested_modules():
    shared = nn.ReLU()
    model = nn.Sequential(nn.Linear(3, 3), shared, nn.Sequential(nn.Tanh(), shared))
    before = [m for m in model.modules()]
    with RescaleSwap(model) as swap:
        swap.reference()
        model(torch.randn(2, 3))
        swap.actual()
        x = torch.randn(2, 3, requires_grad=True)
        model(x).sum().backward()
        with pytest.raises(RuntimeError, match="mismatch"):
            model(x)  # a third pass has no recorded reference
    assert [m for m in model.modules()] == before


def test_bad_options_and_input():
    model, batch = own_model("mlp", num_classes=3, seed=13)
    with pytest.raises(TypeError, match="use_embeddings"):
        DeepLift(model, use_embeddings="yes")
    with pytest.raises(ValueError, match="Interpretable"):
        DeepLift(nn.Linear(2, 2))
    dl = DeepLift(model)
    with pytest.raises(KeyError):
        dl.attribute(baseline={"codes": torch.ones_like(batch["codes"])}, **batch)
    with pytest.raises(RuntimeError, match="broadcast"):
        dl.attribute(baseline={"codes": torch.ones(3, 11, dtype=torch.long), "labs": batch["labs"]}, **batch)
    with pytest.raises(RuntimeError, match="integer"):
        dl.attribute(baseline={"codes": torch.ones(4, 11), "labs": batch["labs"]}, **batch)
    with pytest.raises(AttributeError):
        dl.attribute(baseline=[1, 2], **batch)
    with pytest.raises(RuntimeError, match="out of range"):
        dl.attribute(target_class_idx=3, **batch)
