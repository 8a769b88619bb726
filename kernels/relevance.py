"""Chefer relevance propagation: R <- R + mean_h clamp(A_h * G_h, 0) @ R, and its row form.

Maps and gradients are ``[B, H, N, N]`` (or ``[B, N, N]``, already one head) in any float
dtype; everything accumulates in float32 (float64 stays float64 in the torch path).

Row form: with C_l the head-averaged clamped map of layer l, R_L = (I + C_L)...(I + C_1), so
row r of R_L is e_r^T (I + C_L)...(I + C_1): a row vector pushed from the last layer to the
first, v <- v + v @ C_l, which reads every map once and costs O(L N^2) instead of O(L N^3).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path works without Triton
    triton = None


def _heads(attn: torch.Tensor) -> torch.Tensor:
    return attn if attn.dim() == 4 else attn.unsqueeze(1)


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# Bytes of clamp(A * G) the torch path forms at a time: one reused buffer small enough to stay
# in cache, instead of three passes over freshly allocated [B, H, N, N] temporaries.
TORCH_BLOCK_BYTES = 8 << 20


def _clamped_product(attn: torch.Tensor, grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """clamp(attn * grad, 0) into ``out`` (in ``out``'s dtype, so low-precision maps are upcast)."""
    if attn.dtype == out.dtype and grad.dtype == out.dtype:
        torch.mul(attn, grad, out=out)
    else:
        out.copy_(attn)
        out.mul_(grad)
    return out.clamp_(min=0)


def cam_torch(attn: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """mean over heads of clamp(attn * grad, 0) as ``[B, N, N]`` in the accumulation dtype."""
    attn, grad = _heads(attn), _heads(grad)
    batch, heads, n, _ = attn.shape
    dtype = _acc_dtype(attn)
    out = torch.empty(batch, n, n, dtype=dtype, device=attn.device)
    per_sample = max(1, TORCH_BLOCK_BYTES // max(heads * n * n * 4, 1))
    buf = torch.empty(min(per_sample, batch), heads, n, n, dtype=dtype, device=attn.device)
    for s0 in range(0, batch, per_sample):
        s1 = min(s0 + per_sample, batch)
        prod = _clamped_product(attn[s0:s1], grad[s0:s1], buf[: s1 - s0])
        torch.mean(prod, dim=1, out=out[s0:s1])
    return out


def full_step_torch(R: torch.Tensor, attn: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """One layer of the full path: ``R + cam @ R``."""
    return torch.baddbmm(R, cam_torch(attn, grad), R)


def row_step_torch(v: torch.Tensor, attn: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """One layer of the row path: ``v + v @ cam`` for row vectors ``v`` of shape ``[B, N]``.

    clamp(A * G) is formed block by block in a reused cache-sized buffer (several samples at a
    time when they fit, else blocks of source rows of one sample) and consumed at once by a
    batched GEMV over the heads.
    """
    attn, grad = _heads(attn), _heads(grad)
    batch, heads, n, _ = attn.shape
    row_bytes = heads * n * v.element_size()
    samples = max(1, min(batch, TORCH_BLOCK_BYTES // max(row_bytes * n, 1)))
    rows = n if samples > 1 else max(1, min(n, TORCH_BLOCK_BYTES // max(row_bytes, 1)))
    buf = torch.empty(samples, heads, rows, n, dtype=v.dtype, device=v.device)
    acc = torch.zeros_like(v)
    for s0 in range(0, batch, samples):
        s1 = min(s0 + samples, batch)
        k = s1 - s0
        for i0 in range(0, n, rows):
            i1 = min(i0 + rows, n)
            prod = _clamped_product(attn[s0:s1, :, i0:i1], grad[s0:s1, :, i0:i1], buf[:k, :, : i1 - i0])
            vec = v[s0:s1, None, None, i0:i1].expand(k, heads, 1, i1 - i0).reshape(k * heads, 1, i1 - i0)
            acc[s0:s1] += torch.bmm(vec, prod.reshape(k * heads, i1 - i0, n)).view(k, heads, n).sum(dim=1)
    return v + acc / heads


if triton is not None:

    @triton.jit
    def _row_step_kernel(v_ptr, a_ptr, g_ptr, out_ptr, N, H, inv_heads,
                         stride_ab, stride_ah, stride_ai, stride_gb, stride_gh, stride_gi,
                         BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
        col_ok = cols < N
        acc = tl.zeros((BLOCK_J,), dtype=tl.float32)
        for h in range(0, H):
            a_base = a_ptr + b * stride_ab + h * stride_ah
            g_base = g_ptr + b * stride_gb + h * stride_gh
            for i0 in range(0, N, BLOCK_I):
                rows = i0 + tl.arange(0, BLOCK_I)
                row_ok = rows < N
                vi = tl.load(v_ptr + b * N + rows, mask=row_ok, other=0.0)
                ok = row_ok[:, None] & col_ok[None, :]
                a = tl.load(a_base + rows[:, None].to(tl.int64) * stride_ai + cols[None, :], mask=ok, other=0.0)
                g = tl.load(g_base + rows[:, None].to(tl.int64) * stride_gi + cols[None, :], mask=ok, other=0.0)
                cam = tl.maximum(a.to(tl.float32) * g.to(tl.float32), 0.0)
                acc += tl.sum(vi[:, None] * cam, axis=0)
        v_here = tl.load(v_ptr + b * N + cols, mask=col_ok, other=0.0)
        tl.store(out_ptr + b * N + cols, v_here + acc * inv_heads, mask=col_ok)

    @triton.jit
    def _full_step_kernel(r_ptr, a_ptr, g_ptr, out_ptr, N, H, inv_heads,
                          stride_ab, stride_ah, stride_ai, stride_gb, stride_gh, stride_gi,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        col_ok = cols < N
        r_base = r_ptr + b * N * N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, N, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < N
            ok = row_ok[:, None] & k_ok[None, :]
            # cam tile recomputed per output tile: no [B, N, N] cam is ever written
            cam = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            for h in range(0, H):
                a = tl.load(a_ptr + b * stride_ab + h * stride_ah + rows[:, None].to(tl.int64) * stride_ai
                            + ks[None, :], mask=ok, other=0.0)
                g = tl.load(g_ptr + b * stride_gb + h * stride_gh + rows[:, None].to(tl.int64) * stride_gi
                            + ks[None, :], mask=ok, other=0.0)
                cam += tl.maximum(a.to(tl.float32) * g.to(tl.float32), 0.0)
            r = tl.load(r_base + ks[:, None].to(tl.int64) * N + cols[None, :],
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc += tl.dot(cam * inv_heads, r, input_precision="ieee")
        out_ok = row_ok[:, None] & col_ok[None, :]
        offsets = rows[:, None].to(tl.int64) * N + cols[None, :]
        here = tl.load(r_base + offsets, mask=out_ok, other=0.0)
        tl.store(out_ptr + b * N * N + offsets, here + acc, mask=out_ok)


def _map_args(attn: torch.Tensor, grad: torch.Tensor):
    attn, grad = _heads(attn), _heads(grad)
    if attn.stride(-1) != 1:
        attn = attn.contiguous()
    if grad.stride(-1) != 1:
        grad = grad.contiguous()
    return attn, grad, (attn.stride(0), attn.stride(1), attn.stride(2), grad.stride(0), grad.stride(1), grad.stride(2))


def _need_triton() -> None:
    if triton is None:
        raise RuntimeError("the Triton relevance kernels need the triton package: pip install triton")


def row_step_triton(v: torch.Tensor, attn: torch.Tensor, grad: torch.Tensor,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Fused ``v + v @ mean_h clamp(A_h * G_h, 0)``; ``v`` is float32 ``[B, N]``.
    ``out`` (float32, contiguous, like ``v``) receives the result when given."""
    _need_triton()
    attn, grad, strides = _map_args(attn, grad)
    batch, heads, n, _ = attn.shape
    v = v.contiguous().float()
    out = torch.empty_like(v) if out is None else out
    block_j = min(128, max(16, triton.next_power_of_2(n)))
    grid = (batch, triton.cdiv(n, block_j))
    _row_step_kernel[grid](v, attn, grad, out, n, heads, 1.0 / heads, *strides, BLOCK_I=32, BLOCK_J=block_j)
    return out


def full_step_triton(R: torch.Tensor, attn: torch.Tensor, grad: torch.Tensor,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Fused ``R + (mean_h clamp(A_h * G_h, 0)) @ R``; ``R`` is float32 ``[B, N, N]``.
    ``out`` (float32, contiguous, like ``R``) receives the result when given."""
    _need_triton()
    attn, grad, strides = _map_args(attn, grad)
    batch, heads, n, _ = attn.shape
    R = R.contiguous().float()
    out = torch.empty_like(R) if out is None else out
    block = 32 if n > 16 else 16
    grid = (batch, triton.cdiv(n, block), triton.cdiv(n, block))
    _full_step_kernel[grid](R, attn, grad, out, n, heads, 1.0 / heads, *strides,
                            BLOCK_M=block, BLOCK_N=block, BLOCK_K=block)
    return out
