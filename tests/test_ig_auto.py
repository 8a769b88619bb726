"""IntegratedGradients(steps="auto"): attributions to a requested relative tolerance, checked against a
converged reference from the fast path and from the oracle, per sample, with the cap, the errors and
the cohort runner."""
import dataclasses
import os

import numpy as np
import pytest
import torch
from conftest import own_model

import fastattr
from fastattr.cohort import attribute_dataset, load_attributions
from fastattr.core.adaptive import run_adaptive_integrated_gradients
from fastattr.core.integrated import resolve_options, run_integrated_gradients
from fastattr.core.quadrature import AUTO_TOLERANCE, AutoSteps
from fastattr.loop import path_loop_integrated_gradients


def relative_errors(got: dict, ref: dict) -> torch.Tensor:
    """Per sample, the relative L2 error of its whole attribution (every key flattened together)."""
    flat = lambda d: torch.cat([d[k].reshape(d[k].shape[0], -1).double() for k in sorted(d)], dim=1)  # noqa: E731
    g, r = flat(got), flat(ref)
    return (g - r).norm(dim=1) / r.norm(dim=1).clamp_min(1e-30)


def sharp_forward(points: dict, rows: dict) -> torch.Tensor:
    """Logits whose path derivative has a peak of per-sample sharpness ``rows["k"]``."""
    z = points["x"].sum(-1)
    return torch.stack([torch.tanh(rows["k"] * (z - 0.3)) + 0.1 * z, -z], dim=1)


def test_core_refines_only_where_a_sample_needs_it():
    g = torch.Generator().manual_seed(0)
    xs, bs = {"x": torch.rand(5, 4, generator=g) * 0.5}, {"x": torch.zeros(5, 4)}
    extra = {"k": torch.tensor([0.5, 2.0, 20.0, 60.0, 150.0])}
    targets = torch.zeros(5, dtype=torch.long)
    fine = resolve_options(steps=2048, method="gausslegendre", internal_batch_size=None, backend="torch",
                           device=torch.device("cpu"))
    ref = run_integrated_gradients(sharp_forward, xs, bs, fine, targets=targets, extra=extra).attributions
    auto = dataclasses.replace(fine, auto=AutoSteps(1e-3), return_convergence_delta=True)
    result = run_adaptive_integrated_gradients(sharp_forward, xs, bs, auto, targets=targets, extra=extra)
    errors = relative_errors(result.attributions, ref)
    assert (errors <= 5e-3).all(), errors
    assert result.points[0] == 9, "a smooth path converges on its first nine points"
    assert result.points[3] > 2 * result.points[0], "a sharp peak takes more points"
    assert (result.points <= 129).all() and (result.error <= 1e-3).all()
    assert result.delta.abs().max() < 1e-3 * ref["x"].abs().sum(dim=1).max(), "completeness holds"


@pytest.mark.parametrize("kind", ["transformer", "mlp"])
def test_attributions_match_the_converged_integral_of_the_fast_path_and_the_oracle(kind):
    # The Transformer's path is smooth: Gauss-Legendre converges fast, and the oracle's loop gives
    # the same integral. The MLP's ReLUs make the path piecewise constant: Gauss-Legendre with 128
    # nodes is still 4e-3 off, the reference takes 2048, and auto refines around the kinks.
    model, batch = own_model(kind, seed=3)
    ig = fastattr.IntegratedGradients(model)
    got = ig.attribute(steps="auto", **batch)
    points, estimates = ig.last_steps, ig.last_error_estimates
    reference = ig.attribute(steps=128 if kind == "transformer" else 2048, method="gausslegendre", **batch)
    if kind == "transformer":
        nodes, weights = np.polynomial.legendre.leggauss(64)
        oracle = path_loop_integrated_gradients(model, ((nodes + 1) / 2).tolist(), (weights / 2).tolist(), **batch)
        assert relative_errors(reference, oracle).max() < 1e-4, "the two converged references agree"
    else:
        assert (points > 50).all(), "kinks take points"
    errors = relative_errors(got, reference)
    assert errors.max() <= 2 * AUTO_TOLERANCE, errors
    assert got.keys() == reference.keys() and all(got[k].shape == reference[k].shape for k in got)
    assert points.shape == (4,) and (points >= 9).all() and (points <= 129).all()
    assert estimates.shape == (4,) and (estimates <= AUTO_TOLERANCE).all()
    assert torch.equal(ig.attribute(**batch)["codes"], ig.attribute(steps=50, **batch)["codes"]), \
        "the default stays PyHealth's 50-step rule"
    assert (ig.last_steps == 51).all() and ig.last_error_estimates is None


def test_each_sample_converges_on_its_own_whatever_its_batch():
    model, batch = own_model("transformer", seed=5)
    ig = fastattr.IntegratedGradients(model, steps="auto", tolerance=2e-3)
    together = ig.attribute(**batch)
    points = ig.last_steps.clone()
    for i in range(4):
        one = {k: (v[i:i + 1] if isinstance(v, torch.Tensor) else v[i:i + 1]) for k, v in batch.items()}
        alone = ig.attribute(**one)
        assert ig.last_steps.item() == points[i].item(), i
        for key in alone:
            torch.testing.assert_close(alone[key][0], together[key][i], rtol=1e-4, atol=1e-6)


def test_the_cap_stops_a_sample_and_one_warning_names_it():
    model, batch = own_model("mlp", seed=1)  # ReLU kinks: 1e-6 is out of reach within 129 points
    ig = fastattr.IntegratedGradients(model, steps="auto", tolerance=1e-6)
    with pytest.warns(UserWarning, match=r"4 sample\(s\) stayed above the tolerance 1e-06 at the cap of 129 path "
                                         r"points per sample \(sample: estimated relative error\) 0 \(a\): "):
        ig.attribute(**batch)
    assert (ig.last_steps <= 129).all() and (ig.last_steps > 100).all()
    assert (ig.last_error_estimates > 1e-6).all()


def test_convergence_delta_comes_from_the_paths_own_end_points():
    model, batch = own_model("transformer", seed=2)
    ig = fastattr.IntegratedGradients(model)
    _, delta = ig.attribute(steps="auto", tolerance=1e-3, return_convergence_delta=True, **batch)
    _, fine = ig.attribute(steps=128, method="gausslegendre", return_convergence_delta=True, **batch)
    assert delta.shape == (4,)
    torch.testing.assert_close(delta, fine, rtol=0, atol=5e-3)


@pytest.mark.parametrize("call, message", [
    ({"steps": "auto", "tolerance": 0}, "tolerance must be a positive finite number"),
    ({"steps": "auto", "tolerance": -1e-3}, "tolerance must be a positive finite number"),
    ({"steps": "auto", "tolerance": float("nan")}, "tolerance must be a positive finite number"),
    ({"steps": "auto", "tolerance": float("inf")}, "tolerance must be a positive finite number"),
    ({"steps": "auto", "tolerance": "1e-3"}, "tolerance must be a positive finite number"),
    ({"steps": "auto", "tolerance": True}, "tolerance must be a positive finite number"),
    ({"steps": 50, "tolerance": 1e-3}, "tolerance applies only with steps='auto'; got steps=50"),
    ({"tolerance": 1e-3}, "tolerance applies only with steps='auto'; got steps=50"),
    ({"steps": "auto", "method": "uniform"}, "method cannot be given with steps='auto'"),
    ({"steps": "fast"}, "steps must be an integer >= 1 or 'auto'; got 'fast'"),
])
def test_bad_options_are_named(call, message):
    model, batch = own_model("transformer")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fastattr.IntegratedGradients(model).attribute(**call, **batch)


def test_bad_constructor_options_are_named():
    model, _ = own_model("transformer")
    with pytest.raises(ValueError, match="tolerance applies only with steps='auto'; got steps=50"):
        fastattr.IntegratedGradients(model, tolerance=1e-3)
    with pytest.raises(ValueError, match="tolerance must be a positive finite number"):
        fastattr.IntegratedGradients(model, steps="auto", tolerance=0.0)
    with pytest.raises(ValueError, match="steps must be an integer >= 1 or 'auto'"):
        fastattr.IntegratedGradients(model, steps="Auto")
    with pytest.raises(ValueError, match="steps='auto' is available through fastattr.IntegratedGradients"):
        fastattr.integrated_gradients(lambda d: d["x"], {"x": torch.ones(2, 3)}, steps="auto")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton kernels run through the interpreter")
def test_triton_backend_matches_torch():
    pytest.importorskip("triton")
    model, batch = own_model("transformer", seed=4)
    ig = fastattr.IntegratedGradients(model, steps="auto")
    torch_result = ig.attribute(backend="torch", **batch)
    torch_points = ig.last_steps.clone()
    triton_result = ig.attribute(backend="triton", **batch)
    assert torch.equal(ig.last_steps, torch_points)
    for key in torch_result:
        torch.testing.assert_close(triton_result[key], torch_result[key], rtol=1e-4, atol=1e-6)


def test_listed_row_kernels_match_torch_on_odd_sizes():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels run through the interpreter")
    from fastattr.kernels import interpolate as ops

    g = torch.Generator().manual_seed(0)
    for shape, summed in (((5, 7, 33), True), ((5, 7, 33), False), ((3, 1), False), ((4, 3, 2, 5), True)):
        x, b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        samples = torch.randint(0, shape[0], (11,), generator=g)
        alphas = torch.rand(11, generator=g, dtype=torch.float64)
        rows = ops.interpolate_rows_torch(x, b, samples, alphas)
        torch.testing.assert_close(ops.interpolate_rows_triton(x, b, samples, alphas), rows)
        grads = torch.randn(rows.shape, generator=g)
        torch.testing.assert_close(ops.density_triton(x, b, samples, grads, summed),
                                   ops.density_torch(x, b, samples, grads, summed), rtol=1e-5, atol=1e-6)


def test_the_cohort_runner_stores_each_patients_points_and_estimate(tmp_path):
    model, batch = own_model("transformer", seed=6)
    ig = fastattr.IntegratedGradients(model, steps="auto", tolerance=2e-3)
    attribute_dataset(ig, [batch], tmp_path / "run", progress=False, sort_by_length=False)
    direct = ig.attribute(**batch)
    store = load_attributions(tmp_path / "run")
    assert store.info["options"] == {"steps": "auto", "tolerance": 2e-3}
    for i in range(4):
        assert store[i]["steps"].item() == ig.last_steps[i].item()
        assert abs(store[i]["error_estimate"].item() - ig.last_error_estimates[i].item()) < 1e-9
        row = store[i]["attr/codes"]  # the sample's own length (a list of batches: cut by its mask)
        torch.testing.assert_close(row, direct["codes"][i, :len(row)])
        assert not direct["codes"][i, len(row):].any()
    fixed = tmp_path / "fixed"
    attribute_dataset(fastattr.IntegratedGradients(model, steps=4), [batch], fixed, progress=False,
                      sort_by_length=False)
    assert "steps" not in load_attributions(fixed)[0] and load_attributions(fixed).info["options"] == {"steps": 4}


def test_a_peak_between_the_first_points_is_found_by_the_completeness_gap():
    # The logit jumps across a bump of width ~0.01 at alpha 0.56: the density is ~0 at all nine
    # starting points, so Simpson's estimate alone sees nothing; the panel's completeness gap (the
    # logit moves by ~1 across it) sends the panel to be cut until the bump is resolved.
    def forward(points: dict, rows: dict) -> torch.Tensor:
        z = points["x"].sum(-1)
        return torch.stack([torch.sigmoid((z - 0.56) / 0.002), -z], dim=1)

    xs, bs = {"x": torch.full((2, 4), 0.25)}, {"x": torch.zeros(2, 4)}
    xs["x"][1] *= 0.4  # sample 1's path never reaches the bump: smooth, nine points
    targets = torch.zeros(2, dtype=torch.long)
    fine = resolve_options(steps=4096, method="gausslegendre", internal_batch_size=None, backend="torch",
                           device=torch.device("cpu"))
    ref = run_integrated_gradients(forward, xs, bs, fine, targets=targets).attributions
    assert ref["x"][0].abs().sum() > 0.9, "the bump carries the attribution"
    result = run_adaptive_integrated_gradients(forward, xs, bs, dataclasses.replace(fine, auto=AutoSteps(5e-3)),
                                               targets=targets)
    errors = relative_errors(result.attributions, ref)
    assert errors[0] < 2e-2, errors
    assert result.points[0] > 20 and result.points[1] == 9


def test_adaptive_rounds_plan_their_groups_with_their_own_cost(monkeypatch):
    # A round lists a few rows per sample: its groups are planned with the adaptive rounds' group
    # cost, not the fixed rule's. Either plan gives the same attributions.
    from fastattr.core import packing
    model, batch = own_model("transformer", seed=5)
    ig = fastattr.IntegratedGradients(model, steps="auto")
    monkeypatch.setitem(packing.GROUP_COST["adaptive_integrated_gradients"], "cpu", 0.0)
    monkeypatch.setitem(packing.GROUP_COST["integrated_gradients"], "cpu", 1e12)
    split, split_groups, split_points = ig.attribute(**batch), ig.last_groups, ig.last_steps.clone()
    monkeypatch.setitem(packing.GROUP_COST["adaptive_integrated_gradients"], "cpu", 1e12)
    monkeypatch.setitem(packing.GROUP_COST["integrated_gradients"], "cpu", 0.0)
    whole = ig.attribute(**batch)
    assert len(split_groups) > 1 and ig.last_groups == [(4, None)]
    assert torch.equal(split_points, ig.last_steps)
    for key in whole:
        torch.testing.assert_close(split[key], whole[key], rtol=1e-4, atol=1e-6)


def test_the_bound_benchmark_replays_the_rule_the_library_runs():
    # benchmarks.ig_auto_bound samples each path on a grid and replays the adaptive rule on it:
    # at the default tolerance that must be the real run (same points, same attributions).
    from benchmarks.ig_auto_bound import replay, sampled_paths
    model, batch = own_model("transformer", seed=5)
    ig = fastattr.IntegratedGradients(model, steps="auto", tolerance=1e-3)
    real = ig.attribute(**batch)
    points = ig.last_steps.clone()
    tables = []
    with sampled_paths(256, tables):
        ig.attribute(**batch)
    assert len(tables) == 1
    flat, replayed = replay(tables[0], 256, 1e-3)
    assert torch.equal(replayed, points) and (points > 9).any(), points
    expected = torch.cat([real[k].reshape(4, -1).double() for k in sorted(real)], dim=1)
    torch.testing.assert_close(flat, expected, rtol=1e-4, atol=1e-6)
