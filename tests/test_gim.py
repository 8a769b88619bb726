"""fastattr's GIM and IntegratedGradientGIM against the oracle (``fastattr.loop.gim``: PyHealth 2.1.0's
algorithms with GIM's rules restated by detaching), on fastattr's own protocol models given a PyHealth-style
``Attention`` helper (so every rule applies: temperature softmax, halved products, frozen LayerNorm).

Odd lengths and padding in both a token and a continuous feature, one feature, a batch of one; length groups
on and off equal; the once-per-layout check of the rules' gradients (run once, and refusing trimming on a model
whose logits ignore padding but whose rules' backward reaches it); the rules themselves; the model left as it
was; and bad options refused where they are given.
"""
import math

import pytest
import torch
from conftest import codes, rel_err
from torch import nn

from fastattr.demo.models import FeatureProcessor, FeatureSpec, MLPClassifier, TransformerClassifier
from fastattr.interpret.gradient.gim import GIM
from fastattr.interpret.gradient.gim_rules import FrozenLayerNorm, GIMAttention, TemperatureSoftmax, gim_rules
from fastattr.interpret.gradient.ig import IntegratedGradients
from fastattr.interpret.gradient.ig_gim import IntegratedGradientGIM
from fastattr.loop.gim import loop_gim, loop_ig_gim

TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: the models are tiny, and on a loaded 2-core machine OpenMP spin-waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Attention(nn.Module):
    """PyHealth's attention helper, by shape and name: the rules replace it."""

    def __init__(self, bias: float = 0.0) -> None:
        super().__init__()
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, query, key, value, mask=None, dropout=None):
        scores = torch.matmul(query, key.transpose(-2, -1)) / math.sqrt(query.size(-1))
        if mask is not None:
            scores = scores.masked_fill(mask == 0, -1e9)
        weights = self.softmax(scores)
        return torch.matmul(weights, value), weights


class HelperSelfAttention(nn.Module):
    """Multi-head self-attention through the helper, PyHealth's pairwise mask (padded queries attend nowhere).
    ``leak``: no mask; padded keys are pushed ``leak`` below in score instead (their weight ~e^-leak in the
    forward, but ~e^(-leak / T) in GIM's backward)."""

    def __init__(self, dim: int, heads: int, leak: float | None = None) -> None:
        super().__init__()
        self.heads, self.leak = heads, leak
        self.qkv, self.out, self.attention = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), Attention()

    def forward(self, x, mask, capture):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.leak is None:
            y, _ = self.attention(q, k, v, mask=(mask[:, :, None] & mask[:, None, :])[:, None])
        else:  # one more channel: 1 in every query, 0 or -leak * sqrt(d_head + 1) in the keys
            scale = math.sqrt(q.shape[-1] + 1)
            bias = (~mask).to(k.dtype)[:, None, :, None].expand(b, self.heads, n, 1) * (-self.leak * scale)
            q = torch.cat([q, torch.ones_like(q[..., :1])], dim=-1)
            k = torch.cat([k, bias], dim=-1)
            v = torch.cat([v, torch.zeros_like(v[..., :1])], dim=-1)
            y, _ = self.attention(q, k, v)
            y = y[..., :-1]
        return self.out(y.transpose(1, 2).reshape(b, n, d))


def gim_model(num_classes=3, features=("codes", "labs"), layers=2, heads=2, dim=16, leak=None, seed=0):
    processors = {"codes": FeatureProcessor(token=True, size=40), "labs": FeatureProcessor(token=False, size=5)}
    spec = FeatureSpec({k: processors[k] for k in features})
    torch.manual_seed(seed)
    model = TransformerClassifier(spec, num_classes=num_classes, dim=dim, heads=heads, layers=layers)
    for blocks in model.encoders.values():
        for block in blocks:
            block.attention = HelperSelfAttention(dim, heads, leak)
    return model.eval()


def make_batch(size=5, length=13, seed=1, features=("codes", "labs")):
    g = torch.Generator().manual_seed(seed)
    batch = {"codes": codes(size, length, 40, g), "labs": torch.randn(size, 4, 5, generator=g),
             "label": torch.zeros(size, dtype=torch.long), "patient_id": [f"p{i}" for i in range(size)]}
    batch["labs"][size // 2, 2:] = 0  # a continuous feature's padded steps
    return {k: v for k, v in batch.items() if k in features or k in ("label", "patient_id")}


def long_tailed(size=8, seed=2):
    """One patient of 40 codes, the others of 1-3 (with 20 steps, worth length groups)."""
    g = torch.Generator().manual_seed(seed)
    batch = make_batch(size, 40, seed)
    batch["codes"][1:, 3:] = 0
    batch["codes"][0] = torch.randint(2, 40, (40,), generator=g)
    return batch


def assert_close(got, ref, tol=TOL):
    assert list(got) == list(ref)
    for key in ref:
        assert got[key].shape == ref[key].shape, key
        assert rel_err(got[key], ref[key]) <= tol, (key, rel_err(got[key], ref[key]))


@pytest.mark.parametrize("temperature", [2.0, 1.0, 0.5])
def test_gim_matches_oracle(temperature):
    model, batch = gim_model(), make_batch()
    got = GIM(model, temperature=temperature).attribute(**batch)
    assert_close(got, loop_gim(model, temperature=temperature, **batch))
    assert bool((got["codes"][batch["codes"] == 0] == 0).all())


@pytest.mark.parametrize("pack", ["auto", False])
@pytest.mark.parametrize("temperature", [2.0, 1.0])
def test_ig_gim_matches_oracle(temperature, pack):
    model, batch = gim_model(), make_batch()
    got = IntegratedGradientGIM(model, temperature=temperature, steps=6, pack_lengths=pack).attribute(**batch)
    ref = loop_ig_gim(model, temperature=temperature, steps=6, **batch)
    assert_close(got, ref)
    plain = IntegratedGradients(model, steps=6).attribute(**batch)
    assert rel_err(plain["codes"], ref["codes"]) > 1e-2  # the rules matter on this model


@pytest.mark.parametrize("size", [1, 4])
def test_one_feature_and_batch_of_one(size):
    model, batch = gim_model(num_classes=2, features=("codes",)), make_batch(size, 9, features=("codes",))
    assert_close(GIM(model).attribute(**batch), loop_gim(model, **batch))
    assert_close(IntegratedGradientGIM(model, steps=4).attribute(target_class_idx=0, **batch),
                 loop_ig_gim(model, steps=4, **batch))


def test_custom_baseline_and_target():
    model, batch = gim_model(), make_batch()
    base = {"codes": torch.full_like(batch["codes"], 3), "labs": torch.full_like(batch["labs"], 0.2)}
    got = IntegratedGradientGIM(model, steps=5).attribute(baseline=base, target_class_idx=2, **batch)
    assert_close(got, loop_ig_gim(model, steps=5, baseline=base, target_class_idx=2, **batch))


def test_length_groups_on_and_off_equal_and_rules_checked_once():
    model, batch = gim_model(layers=1), long_tailed()
    ref = loop_ig_gim(model, steps=20, **batch)
    padded = IntegratedGradientGIM(model, steps=20, pack_lengths=False).attribute(**batch)
    explainer = IntegratedGradientGIM(model, steps=20, pack_lengths=True)
    assert_close(explainer.attribute(**batch), ref)
    assert len(explainer.last_groups) > 1
    assert_close(explainer.attribute(**batch), padded)
    assert len(explainer._rules_checked) == 1  # one layout, one set of trimmed dims: checked on the first call


def test_rules_check_refuses_trimming_where_the_backward_reaches_padding():
    """Padded keys 24 below in score: invisible to the logits (~e^-24), not to a backward at T = 8 (~e^-3)."""
    model, batch = gim_model(layers=1, leak=24.0, features=("codes",)), long_tailed()
    batch = {k: v for k, v in batch.items() if k != "labs"}
    plain = IntegratedGradients(model, steps=20, pack_lengths=True)
    plain.attribute(**batch)  # the model's own logits (and IG's gradients) ignore padding
    assert len(plain.last_groups) > 1
    ref = loop_ig_gim(model, temperature=8.0, steps=20, **batch)
    explainer = IntegratedGradientGIM(model, temperature=8.0, steps=20)
    assert_close(explainer.attribute(**batch), ref)
    assert explainer.last_groups == [(len(batch["codes"]), None)]
    assert ref["codes"][batch["codes"] == 0].abs().max() > 1e-3 * ref["codes"].abs().max()
    with pytest.raises(ValueError, match="pack_lengths=True"):
        IntegratedGradientGIM(model, temperature=8.0, steps=20, pack_lengths=True).attribute(**batch)


def test_no_module_to_swap_is_plain_ig():
    spec = FeatureSpec({"codes": FeatureProcessor(token=True, size=40), "labs": FeatureProcessor(token=False, size=5)})
    torch.manual_seed(0)
    model, batch = MLPClassifier(spec, num_classes=3).eval(), make_batch()
    if any(isinstance(m, nn.LayerNorm) for m in model.modules()):
        pytest.skip("the demo MLP has a LayerNorm")
    assert_close(IntegratedGradientGIM(model, temperature=1.0, steps=5).attribute(**batch),
                 IntegratedGradients(model, steps=5).attribute(**batch))


def test_rules():
    torch.manual_seed(0)
    x = torch.randn(3, 6, requires_grad=True)
    g = torch.randn(3, 6)
    (grad,) = torch.autograd.grad(TemperatureSoftmax.apply(x, -1, 2.0), x, g)
    p = torch.softmax(x.detach() / 2.0, dim=-1)
    torch.testing.assert_close(grad, p * (g - (g * p).sum(-1, keepdim=True)))
    q, k, v = (torch.randn(2, 4, 3, requires_grad=True) for _ in range(3))
    plain = torch.autograd.grad((torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(3), -1) @ v).sum(), (q, k, v))
    ruled = torch.autograd.grad(GIMAttention(1.0)(q, k, v)[0].sum(), (q, k, v))
    for got, ref, factor in zip(ruled, plain, (4, 4, 2), strict=True):
        torch.testing.assert_close(got, ref / factor)
    norm = nn.LayerNorm(6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    out = FrozenLayerNorm(norm)(x)
    torch.testing.assert_close(out, norm(x))
    (grad,) = torch.autograd.grad(out, x, g)
    std = torch.sqrt(x.detach().var(-1, unbiased=False, keepdim=True) + norm.eps)
    torch.testing.assert_close(grad, g * norm.weight.detach() / std)


def test_model_left_as_it_was_even_on_error():
    model, batch = gim_model(), make_batch()
    modules = dict(model.named_modules())
    with pytest.raises(RuntimeError, match="inside"), gim_rules(model, 2.0):
        assert not any(type(m).__name__ == "Attention" for m in model.modules())
        assert all(isinstance(parent, FrozenLayerNorm) for parent in model.modules() for child in parent.children()
                   if isinstance(child, nn.LayerNorm))
        raise RuntimeError("inside")
    GIM(model).attribute(**batch)
    IntegratedGradientGIM(model, steps=2).attribute(**batch)
    after = dict(model.named_modules())
    assert list(after) == list(modules) and all(after[k] is modules[k] for k in modules)
    assert all(p.grad is None for p in model.parameters())  # input gradients only


@pytest.mark.parametrize("option", [dict(temperature=float("nan")), dict(temperature=float("-inf")),
                                    dict(temperature="2"), dict(temperature=True), dict(steps=0), dict(steps=1.5)])
def test_bad_options_refused_at_construction(option):
    model = gim_model(layers=1)
    name = next(iter(option))
    with pytest.raises(ValueError, match=name):
        IntegratedGradientGIM(model, **option)
    if name == "temperature":
        with pytest.raises(ValueError, match=name):
            GIM(model, **option)


def test_model_without_the_interpretable_methods_refused_by_name():
    class NoEmbedding(nn.Module):
        feature_keys = ["codes"]

    for cls in (GIM, IntegratedGradientGIM):
        with pytest.raises(ValueError, match="Interpretable"):
            cls(NoEmbedding())
    model, batch = gim_model(layers=1), make_batch()
    model.get_embedding_model = lambda: None
    for explainer in (GIM(model), IntegratedGradientGIM(model, steps=2)):
        with pytest.raises(AssertionError, match="get_embedding_model"):
            explainer.attribute(**batch)
