"""Relevance kernels (Triton interpreter on the CPU) against their torch references."""
import pytest
import torch

from fastattr.core.relevance import chefer_relevance
from fastattr.interpret.attention.chefer import apply_self_attention_rules, avg_heads
from fastattr.kernels import relevance as ops
from fastattr.loop import full_relevance

SHAPES = [(1, 1, 1), (3, 2, 17), (2, 3, 63), (1, 4, 16), (2, 3, 130)]


def maps(batch, heads, n, seed, dtype=torch.float32, three_d=False):
    """Softmax-like maps with padded (exactly zero) key columns, and signed gradients."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, n, n) if three_d else (batch, heads, n, n)
    attn = torch.rand(shape, generator=g)
    valid = torch.randint(1, n + 1, (batch,), generator=g)
    keep = (torch.arange(n)[None, :] < valid[:, None]).view(batch, *([1] * (len(shape) - 2)), n)
    attn = attn * keep
    attn = attn / attn.sum(-1, keepdim=True).clamp_min(1e-6)
    grad = torch.randn(shape, generator=g)
    return attn.to(dtype), grad.to(dtype)



@pytest.mark.parametrize("batch, heads, n", SHAPES)
@pytest.mark.parametrize("three_d", [False, True])
def test_row_kernel_matches_torch(batch, heads, n, three_d):
    attn, grad = maps(batch, heads, n, seed=n + heads, three_d=three_d)
    v = torch.randn(batch, n, generator=torch.Generator().manual_seed(5))
    ref = ops.row_step_torch(v, attn, grad)
    out = torch.full_like(v, float("nan"))
    got = ops.row_step_triton(v, attn, grad, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch, heads, n", SHAPES)
@pytest.mark.parametrize("three_d", [False, True])
def test_full_kernel_matches_torch(batch, heads, n, three_d):
    attn, grad = maps(batch, heads, n, seed=2 * n + heads, three_d=three_d)
    R = torch.randn(batch, n, n, generator=torch.Generator().manual_seed(6))
    ref = ops.full_step_torch(R, attn, grad)
    out = torch.full_like(R, float("nan"))
    got = ops.full_step_triton(R, attn, grad, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_kernels_read_maps_whose_rows_are_not_16_byte_aligned():
    # rows of 101 floats starting one element into their storage: no vector-width assumption holds
    attn, grad = maps(2, 2, 102, seed=3)
    attn, grad = attn[..., 1:, 1:], grad[..., 1:, 1:]
    v = torch.randn(2, 101)
    torch.testing.assert_close(ops.row_step_triton(v, attn, grad), ops.row_step_torch(v, attn, grad),
                               rtol=1e-5, atol=1e-6)
    R = torch.randn(2, 101, 101)
    torch.testing.assert_close(ops.full_step_triton(R, attn, grad), ops.full_step_torch(R, attn, grad),
                               rtol=1e-5, atol=1e-5)


def test_kernels_read_non_contiguous_maps():
    attn, grad = maps(2, 4, 17, seed=9)
    attn_t = attn.transpose(0, 1).contiguous().transpose(0, 1)  # head-major storage
    v = torch.randn(2, 17)
    torch.testing.assert_close(ops.row_step_triton(v, attn_t, grad), ops.row_step_torch(v, attn, grad),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("batch, heads, n, layers", [(3, 2, 17, 3), (1, 1, 1, 2), (2, 4, 40, 1)])
def test_full_path_matches_pyhealth_loop_and_rows_match_full(backend, batch, heads, n, layers):
    stack = [maps(batch, heads, n, seed=10 * i + n) for i in range(layers)]
    R = chefer_relevance(stack, backend=backend)
    torch.testing.assert_close(R, full_relevance(stack), rtol=1e-5, atol=1e-6)
    rows = torch.randint(0, n, (batch,), generator=torch.Generator().manual_seed(n))
    v = chefer_relevance(stack, rows, backend=backend)
    torch.testing.assert_close(v, R[torch.arange(batch), rows], rtol=1e-5, atol=1e-6)


def test_float64_maps_keep_float64():
    stack = [maps(2, 2, 9, seed=i, dtype=torch.float64) for i in range(2)]
    R = chefer_relevance(stack, backend="torch")
    assert R.dtype == torch.float64
    v = chefer_relevance(stack, torch.tensor([0, 8]), backend="torch")
    torch.testing.assert_close(v, R[torch.arange(2), torch.tensor([0, 8])], rtol=1e-12, atol=1e-12)


def test_avg_heads_semantics():
    attn, grad = maps(2, 3, 5, seed=1)
    torch.testing.assert_close(avg_heads(attn, grad), (attn * grad).clamp(min=0).mean(1))
    torch.testing.assert_close(avg_heads(attn[:, 0], grad[:, 0]), (attn[:, 0] * grad[:, 0]).clamp(min=0))
    R = torch.randn(2, 5, 5)
    torch.testing.assert_close(apply_self_attention_rules(R, attn[:, 0]), attn[:, 0] @ R)


@pytest.mark.parametrize("layers, words", [
    ([], "non-empty"),
    ([(torch.rand(2, 3, 3), torch.rand(2, 3, 4))], "differ in shape"),
    ([(torch.rand(2, 3, 3), None)], "no attention gradient"),
    ([(None, torch.rand(2, 3, 3))], "no attention map"),
    ([(torch.rand(2, 3, 4), torch.rand(2, 3, 4))], r"\[B, H, N, N\]"),
    ([(torch.rand(2, 3, 3), torch.rand(2, 3, 3)), (torch.rand(2, 4, 4), torch.rand(2, 4, 4))], "layer 0 has"),
])
def test_bad_layers(layers, words):
    with pytest.raises(ValueError, match=words):
        chefer_relevance(layers)


def test_bad_rows():
    stack = [maps(2, 1, 4, seed=0)]
    with pytest.raises(ValueError, match="rows must lie"):
        chefer_relevance(stack, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="one row per sample"):
        chefer_relevance(stack, torch.tensor([0]))


@pytest.mark.parametrize("share", [0.01, 0.3, 0.7])
@pytest.mark.parametrize("batch, heads, n", [(3, 2, 17), (2, 3, 63), (5, 1, 9)])
def test_torch_blocked_path_matches_the_one_go_path(batch, heads, n, share, monkeypatch):
    # Maps past the block budget are formed block by block (several samples, or source rows of one
    # sample, at a time) in a reused buffer; a budget of a share of the maps forces each blocking.
    attn, grad = maps(batch, heads, n, seed=n + int(100 * share))
    budget = max(16, int(attn.numel() * 4 * share))
    v = torch.randn(batch, n, generator=torch.Generator().manual_seed(1))
    R = torch.randn(batch, n, n, generator=torch.Generator().manual_seed(2))
    whole_row, whole_full = ops.row_step_torch(v, attn, grad), ops.full_step_torch(R, attn, grad)
    monkeypatch.setattr(ops, "TORCH_BLOCK_BYTES", budget)
    assert not ops._small(attn)
    torch.testing.assert_close(ops.row_step_torch(v, attn, grad), whole_row, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ops.full_step_torch(R, attn, grad), whole_full, rtol=1e-5, atol=1e-5)
    cam = (attn * grad).clamp(min=0).mean(1)
    torch.testing.assert_close(whole_row, v + torch.bmm(v[:, None], cam)[:, 0], rtol=1e-5, atol=1e-6)
