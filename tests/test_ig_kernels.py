"""IG kernels (Triton interpreter on the CPU) against their torch references."""
import itertools

import pytest
import torch
from conftest import own_model

import fastattr
from fastattr.core.quadrature import METHODS, quadrature
from fastattr.kernels import interpolate as ops

SHAPES = [(b, n, d) for b, n, d in itertools.product([1, 3], [1, 17, 63], [1, 5, 128, 130])]


def inputs(batch, n, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, d, generator=g).to(dtype), torch.randn(batch, n, d, generator=g).to(dtype)


@pytest.mark.parametrize("batch, n, d", SHAPES)
def test_interpolate_matches_torch_over_odd_chunks(batch, n, d):
    x, b = inputs(batch, n, d, seed=batch * 1000 + n * 10 + d)
    alphas, _ = quadrature("uniform", 6)  # 7 points: chunks of 4 rows never hold whole steps
    total = batch * len(alphas)
    for start in range(0, total, 4):
        rows = min(4, total - start)
        ref = ops.interpolate_torch(x, b, alphas, start, rows)
        out = torch.full((rows, n, d), float("nan"))
        got = ops.interpolate_triton(x, b, alphas, start, rows, out=out)
        assert got.data_ptr() == out.data_ptr()
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("batch, chunk", [(3, 3), (3, 6), (3, 4), (1, 5), (4, 2)])
def test_interpolate_torch_is_each_rows_formula_exactly(batch, chunk):
    """Chunks of whole path points (broadcast) and any other chunk (gathered): ``b + alpha * (x - b)`` per row,
    bitwise."""
    x, b = inputs(batch, 17, 5, seed=batch + chunk)
    alphas, _ = quadrature("uniform", 6)
    total = batch * len(alphas)
    for start in range(0, total, chunk):
        rows = min(chunk, total - start)
        got = ops.interpolate_torch(x, b, alphas, start, rows)
        want = torch.stack([b[r % batch] + alphas[r // batch].float() * (x[r % batch] - b[r % batch])
                            for r in range(start, start + rows)])
        assert torch.equal(got, want), (start, rows)


@pytest.mark.parametrize("method", METHODS)
def test_accumulate_and_finalize_match_torch_for_every_rule(method):
    batch, n, d = 3, 17, 130
    x, b = inputs(batch, n, d, seed=7)
    alphas, weights = quadrature(method, 5)
    total = batch * len(alphas)
    g = torch.Generator().manual_seed(8)
    grads = torch.randn(total, n, d, generator=g)
    acc_ref = torch.zeros(batch, n, d)
    acc_got = torch.zeros(batch, n, d)
    for start in range(0, total, 7):  # 7 rows: chunks straddle steps and samples
        rows = min(7, total - start)
        ops.accumulate_torch(acc_ref, grads[start:start + rows], weights, start)
        ops.accumulate_triton(acc_got, grads[start:start + rows], weights, start)
    torch.testing.assert_close(acc_got, acc_ref, rtol=1e-5, atol=1e-6)
    for sum_last in (False, True):
        ref = ops.finalize_torch(x, b, acc_ref, 2.0, sum_last)
        out = torch.full(ref.shape, float("nan"))
        got = ops.finalize_triton(x, b, acc_got, 2.0, sum_last, out=out)
        assert got.data_ptr() == out.data_ptr()
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch, n, d", [(1, 1, 1), (3, 63, 5), (2, 17, 130)])
def test_finalize_shapes(batch, n, d):
    x, b = inputs(batch, n, d, seed=3)
    acc = torch.randn(batch, n, d)
    for sum_last in (False, True):
        torch.testing.assert_close(ops.finalize_triton(x, b, acc, 3.0, sum_last),
                                   ops.finalize_torch(x, b, acc, 3.0, sum_last), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["transformer", "mlp"])
@pytest.mark.parametrize("method", ["uniform", "gausslegendre", "riemann_trapezoid"])
def test_integrated_gradients_triton_backend_matches_torch(kind, method):
    model, batch = own_model(kind, seed=21)
    ig = fastattr.IntegratedGradients(model, steps=5)
    ref = ig.attribute(method=method, backend="torch", **batch)
    got = ig.attribute(method=method, backend="triton", internal_batch_size=6, **batch)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)


def test_environment_variable_selects_backend(monkeypatch):
    calls = []
    original = ops.accumulate_triton

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(ops, "accumulate_triton", spy)
    model, batch = own_model("mlp", seed=22)
    monkeypatch.setenv("FASTATTR_BACKEND", "torch")
    fastattr.IntegratedGradients(model, steps=2).attribute(**batch)
    assert not calls
    monkeypatch.setenv("FASTATTR_BACKEND", "triton")
    fastattr.IntegratedGradients(model, steps=2).attribute(**batch)
    assert calls


def test_triton_on_cpu_without_interpreter_names_the_fix(monkeypatch):
    from fastattr.core.backend import resolve_backend

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
