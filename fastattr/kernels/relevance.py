"""Chefer relevance propagation: R <- R + mean_h clamp(A_h * G_h, 0) @ R, and its row form.

Maps and gradients are ``[B, H, N, N]`` (or ``[B, N, N]``, already one head) in any float
dtype; everything accumulates in float32 (float64 stays float64 in the torch path).

Row form: with C_l the head-averaged clamped map of layer l, R_L = (I + C_L)...(I + C_1), so
row r of R_L is e_r^T (I + C_L)...(I + C_1): a row vector pushed from the last layer to the
first, v <- v + v @ C_l, which reads every map once and costs O(L N^2) instead of O(L N^3).
"""
from __future__ import annotations

import torch

from ._triton import (
    MIN_WAVES,
    TARGET_SMS,
    autotune,
    flat_grid,
    ieee_float32_matmul,
    need_triton,
    tl,
    triton,
    vector_alignment,
)


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


def _small(attn: torch.Tensor) -> bool:
    """Maps whose clamped product fits the block budget at once: formed in one go (fewer, larger
    ops: at clinical sizes the CPU's per-op dispatch, not the arithmetic, is the cost)."""
    return attn.numel() * 4 <= TORCH_BLOCK_BYTES


def _clamped(attn: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """clamp(attn * grad, 0) of 4-D maps in the accumulation dtype, freshly allocated."""
    dtype = _acc_dtype(attn)
    return torch.mul(attn.to(dtype), grad.to(dtype)).clamp_(min=0)


def cam_torch(attn: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """mean over heads of clamp(attn * grad, 0) as ``[B, N, N]`` in the accumulation dtype."""
    attn, grad = _heads(attn), _heads(grad)
    if _small(attn):
        return _clamped(attn, grad).mean(dim=1)
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
    if _small(attn):
        return torch.baddbmm(v.unsqueeze(1), v.unsqueeze(1), _clamped(attn, grad).mean(dim=1)).squeeze(1)
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


# Row path: every (sample, head, column block) is further split into slices of source rows so
# that even B=4, N=128 launches hundreds of blocks; each block writes a float32 partial sum and a
# second small kernel adds the partials in a fixed order (deterministic, no atomics).
ROW_TARGET_BLOCKS = 4 * MIN_WAVES * TARGET_SMS
ROW_MIN_SLICE = 8


def _row_plan(batch: int, heads: int, n: int, element_size: int) -> tuple[int, int, int]:
    """``(block_j, rows_per_slice, slices)`` of the row path: 256-byte column segments (narrower
    when the maps are too small to fill the GPU otherwise), and source rows cut into power-of-two
    slices until about ``ROW_TARGET_BLOCKS`` blocks run."""
    block_j = min(256 // element_size, max(16, triton.next_power_of_2(n)))
    while True:
        blocks = batch * heads * triton.cdiv(n, block_j)
        wanted = triton.cdiv(ROW_TARGET_BLOCKS, blocks)
        rows = min(triton.next_power_of_2(n), max(ROW_MIN_SLICE, triton.next_power_of_2(triton.cdiv(n, wanted))))
        slices = triton.cdiv(n, rows)
        if blocks * slices >= MIN_WAVES * TARGET_SMS or block_j <= 32:
            return block_j, rows, slices
        block_j //= 2


def _rows_fit_slice(configs, named_args, **kwargs):
    """Autotune pruning for the row kernel: no source-row tile taller than the slice."""
    fit = [c for c in configs if c.kwargs["BLOCK_I"] <= kwargs["ROWS"]]
    return fit or [min(configs, key=lambda c: c.kwargs["BLOCK_I"])]


def _enough_blocks(configs, named_args, **kwargs):
    """Autotune pruning for the map kernel: keep the tilings that give every SM of the target at
    least ``MIN_WAVES`` blocks; when none does (tiny maps), the one with the most blocks."""
    n, batch = named_args["N"], named_args["B"]

    def blocks(c):
        return batch * triton.cdiv(n, c.kwargs["BLOCK_I"]) * triton.cdiv(n, c.kwargs["BLOCK_J"])
    full = [c for c in configs if blocks(c) >= MIN_WAVES * TARGET_SMS]
    return full or [max(configs, key=blocks)]


if triton is not None:

    @autotune(configs=[triton.Config({"BLOCK_I": bi, "STAGES": st}, num_warps=w)
                       for bi, w, st in ((32, 4, 1), (8, 2, 3), (8, 4, 3), (16, 4, 3), (16, 2, 3), (32, 8, 3),
                                         (16, 4, 1), (8, 4, 1))],
              key=["N", "H", "ROWS", "BLOCK_J", "ALIGN"], prune_configs_by={"early_config_prune": _rows_fit_slice})
    @triton.jit
    def _row_partial_kernel(v_ptr, a_ptr, g_ptr, part_ptr, N, H, slices, col_blocks,
                            stride_ab, stride_ah, stride_ai, stride_gb, stride_gh, stride_gi,
                            ROWS: tl.constexpr, BLOCK_J: tl.constexpr, ALIGN: tl.constexpr,
                            BLOCK_I: tl.constexpr, STAGES: tl.constexpr):
        # partial[b, h * slices + s, j] = sum over source rows i of slice s of
        #                                 v[b, i] * max(A[b, h, i, j] * G[b, h, i, j], 0)
        pid = tl.program_id(0)
        jb = pid % col_blocks
        rest = pid // col_blocks
        s = rest % slices
        rest = rest // slices
        h = (rest % H).to(tl.int64)
        b = (rest // H).to(tl.int64)
        cols = jb * BLOCK_J + tl.arange(0, BLOCK_J)
        # N is a multiple of ALIGN: saying so lets the column mask keep 16-byte loads
        col_ok = cols < tl.multiple_of(tl.full((BLOCK_J,), N, tl.int32), ALIGN)
        first = s * ROWS
        end = tl.minimum(first + ROWS, N)
        a_base = b * stride_ab + h * stride_ah
        g_base = b * stride_gb + h * stride_gh
        acc = tl.zeros((BLOCK_J,), dtype=tl.float32)
        for i0 in tl.range(first, end, BLOCK_I, num_stages=STAGES):
            rows = i0 + tl.arange(0, BLOCK_I)
            row_ok = rows < end
            ok = row_ok[:, None] & col_ok[None, :]
            vi = tl.load(v_ptr + b * N + rows, mask=row_ok, other=0.0)
            a_idx = tl.multiple_of(a_base + rows[:, None].to(tl.int64) * stride_ai + cols[None, :], [1, ALIGN])
            g_idx = tl.multiple_of(g_base + rows[:, None].to(tl.int64) * stride_gi + cols[None, :], [1, ALIGN])
            a = tl.load(a_ptr + a_idx, mask=ok, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + g_idx, mask=ok, other=0.0).to(tl.float32)
            acc += tl.sum(vi[:, None] * tl.maximum(a * g, 0.0), axis=0)
        parts = H * slices
        tl.store(part_ptr + (b * parts + h * slices + s) * N + cols, acc, mask=col_ok)

    @triton.jit
    def _row_combine_kernel(v_ptr, part_ptr, out_ptr, N, parts, inv_heads, col_blocks, BLOCK: tl.constexpr):
        # out = v + (sum of the partials, in index order) / H
        pid = tl.program_id(0)
        b = (pid // col_blocks).to(tl.int64)
        cols = (pid % col_blocks) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < N
        here = part_ptr + b * parts * N + cols
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for _ in range(0, parts):
            acc += tl.load(here, mask=ok, other=0.0)
            here += N
        v = tl.load(v_ptr + b * N + cols, mask=ok, other=0.0)
        tl.store(out_ptr + b * N + cols, v + acc * inv_heads, mask=ok)

    @autotune(configs=[triton.Config({"BLOCK_I": bi, "BLOCK_J": bj}, num_warps=w)
                       for bi, bj, w in ((16, 64, 4), (8, 64, 4), (8, 128, 4), (16, 128, 8), (32, 64, 8),
                                         (4, 128, 4), (4, 64, 2), (32, 128, 8), (8, 32, 2), (4, 32, 1))],
              key=["B", "N", "H", "ALIGN"], prune_configs_by={"early_config_prune": _enough_blocks})
    @triton.jit
    def _cam_kernel(a_ptr, g_ptr, cam_ptr, B, N, H, inv_heads,
                    stride_ab, stride_ah, stride_ai, stride_gb, stride_gh, stride_gi,
                    ALIGN: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
        # cam[b] = mean_h max(A[b, h] * G[b, h], 0), one [BLOCK_I, BLOCK_J] tile per block: each
        # map element is read once, the float32 result written once.
        pid = tl.program_id(0)
        col_blocks = tl.cdiv(N, BLOCK_J)
        row_blocks = tl.cdiv(N, BLOCK_I)
        jb = pid % col_blocks
        rest = pid // col_blocks
        rows = (rest % row_blocks) * BLOCK_I + tl.arange(0, BLOCK_I)
        b = (rest // row_blocks).to(tl.int64)
        cols = jb * BLOCK_J + tl.arange(0, BLOCK_J)
        col_ok = cols < tl.multiple_of(tl.full((BLOCK_J,), N, tl.int32), ALIGN)
        ok = (rows < N)[:, None] & col_ok[None, :]
        a_idx = tl.multiple_of(b * stride_ab + rows[:, None].to(tl.int64) * stride_ai + cols[None, :], [1, ALIGN])
        g_idx = tl.multiple_of(b * stride_gb + rows[:, None].to(tl.int64) * stride_gi + cols[None, :], [1, ALIGN])
        acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
        for _ in range(0, H):
            a = tl.load(a_ptr + a_idx, mask=ok, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + g_idx, mask=ok, other=0.0).to(tl.float32)
            acc += tl.maximum(a * g, 0.0)
            a_idx += stride_ah
            g_idx += stride_gh
        out = cam_ptr + b * N * N + rows[:, None].to(tl.int64) * N + cols[None, :]
        tl.store(out, acc * inv_heads, mask=ok)


def _map_args(attn: torch.Tensor, grad: torch.Tensor):
    attn, grad = _heads(attn), _heads(grad)
    if attn.stride(-1) != 1:
        attn = attn.contiguous()
    if grad.stride(-1) != 1:
        grad = grad.contiguous()
    strides = (attn.stride(0), attn.stride(1), attn.stride(2), grad.stride(0), grad.stride(1), grad.stride(2))
    return attn, grad, strides, vector_alignment((attn, grad), attn.shape[-1])


def row_step_triton(v: torch.Tensor, attn: torch.Tensor, grad: torch.Tensor,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Fused ``v + v @ mean_h clamp(A_h * G_h, 0)``; ``v`` is float32 ``[B, N]``.
    ``out`` (float32, contiguous, like ``v``) receives the result when given.

    Two launches: partial sums over slices of source rows (every map element read once, in
    256-byte row segments), then their fixed-order sum plus ``v``."""
    need_triton("relevance")
    attn, grad, strides, align = _map_args(attn, grad)
    batch, heads, n, _ = attn.shape
    v = v.contiguous().float()
    out = torch.empty_like(v) if out is None else out
    block_j, rows, slices = _row_plan(batch, heads, n, attn.element_size())
    col_blocks = triton.cdiv(n, block_j)
    partial = torch.empty(batch, heads * slices, n, dtype=torch.float32, device=v.device)
    _row_partial_kernel[flat_grid(batch * heads * slices * col_blocks)](
        v, attn, grad, partial, n, heads, slices, col_blocks, *strides, ROWS=rows, BLOCK_J=block_j, ALIGN=align)
    block = min(1024, max(16, triton.next_power_of_2(n)))
    combine_blocks = triton.cdiv(n, block)
    _row_combine_kernel[flat_grid(batch * combine_blocks)](v, partial, out, n, heads * slices, 1.0 / heads,
                                                           combine_blocks, BLOCK=block)
    return out


def cam_triton(attn: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Fused :func:`cam_torch` for float32/float16/bfloat16 maps: ``[B, N, N]`` float32."""
    need_triton("relevance")
    attn, grad, strides, align = _map_args(attn, grad)
    batch, heads, n, _ = attn.shape
    cam = torch.empty(batch, n, n, dtype=torch.float32, device=attn.device)

    def grid(meta):
        return flat_grid(batch * triton.cdiv(n, meta["BLOCK_I"]) * triton.cdiv(n, meta["BLOCK_J"]))
    _cam_kernel[grid](attn, grad, cam, batch, n, heads, 1.0 / heads, *strides, ALIGN=align)
    return cam


def full_step_triton(R: torch.Tensor, attn: torch.Tensor, grad: torch.Tensor,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """``R + (mean_h clamp(A_h * G_h, 0)) @ R`` for float32 ``R`` ``[B, N, N]``: the head average
    fused in one kernel (maps read once), the product by cuBLAS in IEEE float32 (no TF32).
    ``out`` (float32, contiguous, not ``R`` itself) receives the result when given."""
    cam = cam_triton(attn, grad)
    R = R.contiguous().float()
    with ieee_float32_matmul():
        return torch.baddbmm(R, cam, R, out=out) if out is not None else torch.baddbmm(R, cam, R)
