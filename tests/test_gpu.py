"""GPU tier: compiled kernels against the torch references (skipped without CUDA)."""
import pytest
import torch
from conftest import own_model

import fastattr
from fastattr.core.quadrature import quadrature
from fastattr.kernels import interpolate as ig_ops
from fastattr.kernels import relevance as rel_ops

pytestmark = pytest.mark.gpu

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
DTYPES = list(TOL)


def cuda_maps(batch, heads, n, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    attn = torch.rand(batch, heads, n, n, device="cuda", generator=g)
    valid = torch.randint(1, n + 1, (batch,), device="cuda", generator=g)
    attn = attn * (torch.arange(n, device="cuda")[None, :] < valid[:, None])[:, None, None, :]
    attn = attn / attn.sum(-1, keepdim=True).clamp_min(1e-6)
    return attn.to(dtype), torch.randn(batch, heads, n, n, device="cuda", generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, n, d", [(1, 1, 1), (3, 17, 5), (3, 63, 130), (2, 500, 128)])
def test_ig_kernels(dtype, batch, n, d):
    rtol, atol = TOL[dtype]
    x = torch.randn(batch, n, d, device="cuda").to(dtype)
    b = torch.randn(batch, n, d, device="cuda").to(dtype)
    alphas, weights = quadrature("gausslegendre", 7)
    total = batch * len(alphas)
    grads = torch.randn(total, n, d, device="cuda").to(dtype)
    acc_ref = torch.zeros(batch, n, d, device="cuda")
    acc_got = torch.zeros_like(acc_ref)
    for start in range(0, total, 5):
        rows = min(5, total - start)
        out = torch.full((rows, n, d), float("nan"), device="cuda", dtype=dtype)
        got = ig_ops.interpolate_triton(x, b, alphas, start, rows, out=out)
        ref = ig_ops.interpolate_torch(x.float(), b.float(), alphas, start, rows).to(dtype)
        torch.testing.assert_close(got, ref, rtol=rtol, atol=atol)
        ig_ops.accumulate_torch(acc_ref, grads[start:start + rows].float(), weights, start)
        ig_ops.accumulate_triton(acc_got, grads[start:start + rows], weights, start)
    torch.testing.assert_close(acc_got, acc_ref, rtol=1e-5, atol=1e-5)
    for sum_last in (False, True):
        ref = ig_ops.finalize_torch(x.float(), b.float(), acc_ref, 8.0, sum_last)
        torch.testing.assert_close(ig_ops.finalize_triton(x, b, acc_got, 8.0, sum_last), ref, rtol=1e-4, atol=1e-4)


def test_ig_interpolate_past_int32_indexing():
    # 2^31 + a few elements per tensor in the output: offsets must be int64.
    n, d = 1 << 15, (1 << 16) + 3
    x = torch.randn(1, n, d, device="cuda", dtype=torch.float16)
    b = torch.zeros_like(x)
    alphas = torch.tensor([0.5, 1.0], dtype=torch.float64)
    out = ig_ops.interpolate_triton(x, b, alphas, 1, 1)
    assert torch.equal(out[0, -1, -5:], x[0, -1, -5:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, heads, n", [(1, 1, 1), (3, 2, 17), (2, 4, 63), (2, 3, 500), (1, 2, 1024)])
def test_relevance_kernels(dtype, batch, heads, n):
    rtol, atol = TOL[dtype]
    attn, grad = cuda_maps(batch, heads, n, dtype, seed=n)
    v = torch.randn(batch, n, device="cuda")
    ref = rel_ops.row_step_torch(v, attn, grad)
    torch.testing.assert_close(rel_ops.row_step_triton(v, attn, grad), ref, rtol=rtol, atol=atol)
    if n <= 500:
        R = torch.randn(batch, n, n, device="cuda")
        torch.testing.assert_close(rel_ops.full_step_triton(R, attn, grad), rel_ops.full_step_torch(R, attn, grad),
                                   rtol=max(rtol, 1e-4), atol=max(atol, 1e-3))


@pytest.mark.parametrize("n", [100, 512])
def test_full_path_stays_ieee_float32_under_global_tf32(n):
    attn, grad = cuda_maps(2, 4, n, torch.float32, seed=7)
    R = torch.randn(2, n, n, device="cuda")
    ref = rel_ops.full_step_torch(R.double(), attn.double(), grad.double())
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 for every other float32 matmul
    try:
        got = rel_ops.full_step_triton(R, attn, grad)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(previous)
    error = (got.double() - ref).norm() / ref.norm()
    assert error < 1e-6, f"relative error {error:.2e}: the product ran in TF32"


def test_row_path_is_deterministic():
    attn, grad = cuda_maps(4, 4, 512, torch.float32, seed=11)
    v = torch.randn(4, 512, device="cuda")
    first = rel_ops.row_step_triton(v, attn, grad)
    assert all(torch.equal(first, rel_ops.row_step_triton(v, attn, grad)) for _ in range(5))


def test_end_to_end_on_gpu():
    model, batch = own_model("transformer", seed=30)
    model = model.cuda()
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    ig = fastattr.IntegratedGradients(model, steps=20)
    ref = ig.attribute(backend="torch", **batch)
    got = ig.attribute(backend="triton", **batch)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5)
    chefer = fastattr.CheferRelevance(model)
    ref = chefer.attribute(backend="torch", **batch)
    got = chefer.attribute(backend="triton", **batch)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5)


def test_length_packing_on_cuda_equals_padded_and_oracle(monkeypatch):
    from conftest import codes, rel_err

    from fastattr.core import packing
    from fastattr.loop import step_loop_integrated_gradients

    monkeypatch.setitem(packing.GROUP_COST["integrated_gradients"], "cuda", 0.0)  # every length its own group
    model, _ = own_model("transformer", seed=3)
    model = model.cuda()
    x = codes(9, 37, 40, torch.Generator().manual_seed(1)).cuda()
    labs = torch.randn(9, 3, 5, device="cuda")
    ig = fastattr.IntegratedGradients(model, steps=8)
    packed = ig.attribute(codes=x, labs=labs)
    assert len(ig.last_groups) > 1
    padded = ig.attribute(codes=x, labs=labs, pack_lengths=False)
    oracle = step_loop_integrated_gradients(model, steps=8, codes=x, labs=labs)
    for k in packed:
        assert rel_err(packed[k], padded[k]) <= 1e-5 and rel_err(packed[k], oracle[k]) <= 1e-5
    assert bool((packed["codes"][x == 0] == 0).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_listed_row_kernels(dtype):
    rtol, atol = TOL[dtype]
    g = torch.Generator(device="cuda").manual_seed(3)
    for shape, summed in (((3, 17, 5), True), ((3, 63, 130), False), ((2, 500, 128), True)):
        x = torch.randn(shape, device="cuda", generator=g).to(dtype)
        b = torch.randn(shape, device="cuda", generator=g).to(dtype)
        samples = torch.randint(0, shape[0], (19,), device="cuda", generator=g)
        alphas = torch.rand(19, device="cuda", generator=g, dtype=torch.float64)
        rows = ig_ops.interpolate_rows_torch(x.float(), b.float(), samples, alphas)
        torch.testing.assert_close(ig_ops.interpolate_rows_triton(x, b, samples, alphas).float(),
                                   ig_ops.interpolate_rows_torch(x, b, samples, alphas).float(), rtol=rtol, atol=atol)
        grads = torch.randn(rows.shape, device="cuda", generator=g).to(dtype)
        torch.testing.assert_close(ig_ops.density_triton(x, b, samples, grads, summed),
                                   ig_ops.density_torch(x, b, samples, grads, summed), rtol=rtol, atol=atol * 10)


def test_auto_steps_on_cuda_match_the_cpu():
    model, batch = own_model("transformer", seed=3)
    ig = fastattr.IntegratedGradients(model, steps="auto")
    on_cpu = ig.attribute(backend="torch", **batch)
    cpu_points = ig.last_steps.clone()
    model.cuda()
    on_cuda = ig.attribute(backend="triton", **{k: v.cuda() if isinstance(v, torch.Tensor) else v
                                                for k, v in batch.items()})
    assert (ig.last_steps.cpu() - cpu_points).abs().max() <= 4, "the same panels, up to a near-threshold one"
    for key in on_cpu:
        torch.testing.assert_close(on_cuda[key].cpu(), on_cpu[key], rtol=1e-3, atol=1e-5)
