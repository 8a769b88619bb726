"""The model-agnostic core and IntegratedGradients on fastattr's own protocol models."""
import pytest
import torch
from conftest import own_model, rel_err

import fastattr
from fastattr.core.integrated import integrated_gradients
from fastattr.core.quadrature import METHODS, quadrature
from fastattr.loop import step_loop_integrated_gradients


@pytest.mark.parametrize("method", METHODS)
def test_quadrature_weights_integrate_polynomials(method):
    alphas, weights = quadrature(method, 6)
    assert torch.isclose(weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert alphas.min() >= 0 and alphas.max() <= 1
    line = (weights * (3 * alphas + 1)).sum().item()
    if method in ("riemann_left", "riemann_right"):
        assert abs(line - 2.5) == pytest.approx(0.25)  # off by half a step, as a one-sided rule is
    else:
        assert abs(line - 2.5) < 1e-12
    # Gauss-Legendre with 6 nodes is exact up to degree 11.
    if method == "gausslegendre":
        assert abs((weights * alphas ** 11).sum().item() - 1 / 12) < 1e-12


def test_linear_model_attribution_is_exact_for_every_rule():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(7, generator=g, dtype=torch.float64)
    x = torch.randn(5, 7, generator=g, dtype=torch.float64)
    b = torch.randn(5, 7, generator=g, dtype=torch.float64)
    for method in ("riemann_left", "riemann_middle", "riemann_trapezoid", "gausslegendre", "uniform"):
        attr = integrated_gradients(lambda d: (d["x"] @ w).unsqueeze(1), {"x": x}, {"x": b}, steps=4,
                                    method=method)["x"]
        torch.testing.assert_close(attr, (x - b) * w, rtol=1e-12, atol=1e-12)


def test_quadratic_model_matches_closed_form_with_gausslegendre():
    # f(x) = sum(x^2): IG from b to x is (x - b) * (x + b) exactly; 2 Gauss nodes integrate it.
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    b = torch.randn(3, 4, generator=g, dtype=torch.float64)
    attr, delta = integrated_gradients(lambda d: (d["x"] ** 2).sum(1, keepdim=True), {"x": x}, {"x": b},
                                       steps=2, method="gausslegendre", return_convergence_delta=True)
    torch.testing.assert_close(attr["x"], (x - b) * (x + b), rtol=1e-12, atol=1e-12)
    assert delta.abs().max() < 1e-12


@pytest.mark.parametrize("kind", ["transformer", "mlp"])
def test_matches_step_loop_on_own_models(kind):
    model, batch = own_model(kind)
    for steps in (1, 7):
        ref = step_loop_integrated_gradients(model, steps=steps, **batch)
        got = fastattr.IntegratedGradients(model).attribute(steps=steps, **batch)
        assert set(got) == {"codes", "labs"}
        for k in ref:
            assert got[k].shape == batch[k].shape
            assert rel_err(got[k], ref[k]) < 1e-5, k


def test_internal_batch_size_does_not_change_results():
    model, batch = own_model("transformer", seed=3)
    ig = fastattr.IntegratedGradients(model, steps=9)
    runs = [ig.attribute(internal_batch_size=n, **batch) for n in (1, 7, 4 * 10)]
    for other in runs[1:]:
        for k in runs[0]:
            assert (other[k] - runs[0][k]).abs().max().item() <= 1e-6 * runs[0][k].abs().max().item()


def test_convergence_delta_shrinks_with_steps_under_gausslegendre():
    model, batch = own_model("transformer", seed=4)
    ig = fastattr.IntegratedGradients(model)
    deltas = [ig.attribute(steps=s, method="gausslegendre", return_convergence_delta=True,
                           **batch)[1].abs().max().item()
              for s in (1, 4, 16)]
    assert deltas[2] < deltas[1] < deltas[0]
    assert deltas[2] < 1e-4


def test_convergence_delta_is_completeness_gap():
    """The delta is sum(attributions) - (f(x) - f(b)) with f computed here by hand, and under the
    uniform rule (a Riemann sum) it shrinks towards 0 as the steps grow."""
    model, batch = own_model("mlp", seed=5)
    embed = model.get_embedding_model()
    codes, labs = batch["codes"], batch["labs"]
    masks = {"codes": (codes != 0).int(), "labs": (labs.abs().sum(-1) != 0).int()}

    def f(c, labs_value):
        e = embed({"codes": c, "labs": labs_value})
        return model.forward_from_embedding(codes=(e["codes"], masks["codes"]),
                                            labs=(e["labs"], masks["labs"]))["logit"]

    with torch.no_grad():
        fx, fb = f(codes, labs), f(torch.ones_like(codes), torch.zeros_like(labs) + 0.01)
    target = fx.argmax(1, keepdim=True)
    gap = (fx.gather(1, target) - fb.gather(1, target)).squeeze(1)
    assert gap.abs().min() > 1e-3  # the check below is not trivially satisfied
    ig = fastattr.IntegratedGradients(model)
    sizes = []
    for steps in (3, 30, 300):
        attrs, delta = ig.attribute(steps=steps, return_convergence_delta=True, **batch)
        total = sum(a.reshape(4, -1).sum(1) for a in attrs.values())
        torch.testing.assert_close(delta, total - gap, rtol=0, atol=1e-5)
        sizes.append(delta.abs().max().item())
    assert sizes[2] < sizes[1] < sizes[0]
    assert sizes[2] < 0.02 * gap.abs().max().item()


def test_no_parameter_grad_left_and_model_unchanged():
    model, batch = own_model("transformer", seed=6)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fastattr.IntegratedGradients(model).attribute(steps=5, **batch)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_per_sample_targets_equal_separate_calls():
    model, batch = own_model("transformer", seed=7)
    ig = fastattr.IntegratedGradients(model, steps=4)
    targets = torch.tensor([2, 0, 1, 2])
    both = ig.attribute(target_class_idx=targets, **batch)
    for cls in range(3):
        single = ig.attribute(target_class_idx=cls, **batch)
        rows = targets == cls
        for k in both:
            torch.testing.assert_close(both[k][rows], single[k][rows], rtol=1e-5, atol=1e-7)


def test_default_target_is_argmax_and_custom_baseline_is_used():
    model, batch = own_model("mlp", seed=8)
    ig = fastattr.IntegratedGradients(model, steps=4)
    with torch.no_grad():
        pred = model(**batch)["logit"].argmax(-1)
    default = ig.attribute(**batch)
    explicit = ig.attribute(target_class_idx=pred, **batch)
    for k in default:
        torch.testing.assert_close(default[k], explicit[k])
    base = {"codes": torch.zeros_like(batch["codes"]), "labs": torch.full_like(batch["labs"], 0.5)}
    ref = step_loop_integrated_gradients(model, steps=4, baseline=base, **batch)
    got = ig.attribute(baseline=base, **batch)
    for k in ref:
        assert rel_err(got[k], ref[k]) < 1e-5


def test_use_embeddings_false_on_continuous_only():
    from fastattr.demo.models import FeatureProcessor, FeatureSpec, MLPClassifier

    torch.manual_seed(0)
    model = MLPClassifier(FeatureSpec({"labs": FeatureProcessor(token=False, size=6)}), num_classes=2).eval()
    batch = {"labs": torch.randn(5, 6)}
    ref = step_loop_integrated_gradients(model, steps=6, use_embeddings=False, **batch)
    got = fastattr.IntegratedGradients(model, use_embeddings=False).attribute(steps=6, **batch)
    assert rel_err(got["labs"], ref["labs"]) < 1e-5
