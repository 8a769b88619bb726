"""Integrated-gradients path construction and gradient reduction.

Rows of a chunk are laid out step-major: global row ``r`` is sample ``r % B`` at path point
``r // B``. A chunk is the row range ``[row_start, row_start + rows)``, so chunks need not hold
whole steps and results do not depend on how the rows are split.
"""
from __future__ import annotations

import torch


def _row_index(batch: int, row_start: int, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.arange(row_start, row_start + rows, device=device)
    return r % batch, r // batch


def interpolate_torch(x: torch.Tensor, baseline: torch.Tensor, alphas: torch.Tensor, row_start: int, rows: int) -> torch.Tensor:
    """Rows ``b + alpha * (x - b)`` of the path, ``[rows, *x.shape[1:]]``, in ``x.dtype``.

    ``baseline`` has the shape of ``x``; ``alphas`` holds every path point of the call.
    """
    sample, step = _row_index(x.shape[0], row_start, rows, x.device)
    xs = x.index_select(0, sample)
    bs = baseline.index_select(0, sample)
    alpha = alphas.to(device=x.device, dtype=x.dtype).index_select(0, step)
    alpha = alpha.view(-1, *([1] * (x.dim() - 1)))
    return bs + alpha * (xs - bs)


def accumulate_torch(acc: torch.Tensor, grads: torch.Tensor, weights: torch.Tensor, row_start: int) -> None:
    """``acc[sample] += weights[step] * grads[row]`` over the chunk's rows, in place."""
    sample, step = _row_index(acc.shape[0], row_start, grads.shape[0], acc.device)
    w = weights.to(device=acc.device, dtype=acc.dtype).index_select(0, step)
    acc.index_add_(0, sample, grads.to(acc.dtype) * w.view(-1, *([1] * (acc.dim() - 1))))


def finalize_torch(x: torch.Tensor, baseline: torch.Tensor, acc: torch.Tensor, divisor: float, sum_last_dim: bool) -> torch.Tensor:
    """Attribution ``(x - b) * (acc / divisor)``, summed over the last dim when asked."""
    attr = (x - baseline).to(acc.dtype) * (acc / divisor)
    return attr.sum(dim=-1) if sum_last_dim else attr


try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path works without Triton
    triton = None

BLOCK = 1024

if triton is not None:

    @triton.jit
    def _interpolate_kernel(x_ptr, b_ptr, alpha_ptr, out_ptr, row_start, batch, width, BLOCK: tl.constexpr):
        local = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < width
        row = row_start + local
        sample = row % batch
        alpha = tl.load(alpha_ptr + row // batch)
        x = tl.load(x_ptr + sample * width + cols, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + sample * width + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + local * width + cols, (b + alpha * (x - b)).to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _accumulate_kernel(acc_ptr, g_ptr, w_ptr, row_start, rows, batch, width, BLOCK: tl.constexpr):
        # One program owns one sample's slice of the accumulator and walks that sample's rows of
        # the chunk in order: no atomics, the same sum order as the torch reference.
        sample = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < width
        first = row_start + (sample - row_start % batch + batch) % batch
        end = row_start + rows
        count = (end - first + batch - 1) // batch
        acc = tl.load(acc_ptr + sample * width + cols, mask=ok, other=0.0)
        for k in range(0, count):
            row = first + k * batch
            w = tl.load(w_ptr + row // batch)
            g = tl.load(g_ptr + (row - row_start) * width + cols, mask=ok, other=0.0).to(tl.float32)
            acc += w * g
        tl.store(acc_ptr + sample * width + cols, acc, mask=ok)

    @triton.jit
    def _finalize_kernel(x_ptr, b_ptr, acc_ptr, out_ptr, width, inner, inv_divisor,
                         SUM_LAST: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        if SUM_LAST:
            # one program per output element: reduce ``inner`` contiguous values
            total = tl.zeros((BLOCK,), dtype=tl.float32)
            for start in range(0, inner, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                ok = cols < inner
                offs = pid * inner + cols
                x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
                b = tl.load(b_ptr + offs, mask=ok, other=0.0).to(tl.float32)
                a = tl.load(acc_ptr + offs, mask=ok, other=0.0)
                total += (x - b) * (a * inv_divisor)
            tl.store(out_ptr + pid, tl.sum(total, axis=0))
        else:
            offs = pid * BLOCK + tl.arange(0, BLOCK)
            ok = offs < width
            x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            a = tl.load(acc_ptr + offs, mask=ok, other=0.0)
            tl.store(out_ptr + offs, (x - b) * (a * inv_divisor), mask=ok)


def _need_triton() -> None:
    if triton is None:
        raise RuntimeError("the Triton IG kernels need the triton package: pip install triton")


def interpolate_triton(x: torch.Tensor, baseline: torch.Tensor, alphas: torch.Tensor, row_start: int, rows: int,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """Fused :func:`interpolate_torch`: every row of the chunk in one launch (float32 math)."""
    _need_triton()
    batch = x.shape[0]
    x, baseline = x.contiguous(), baseline.contiguous()
    width = x[0].numel()
    if out is None:
        out = torch.empty((rows, *x.shape[1:]), dtype=x.dtype, device=x.device)
    alpha = alphas.to(device=x.device, dtype=torch.float32).contiguous()
    if rows and width:
        _interpolate_kernel[(rows, triton.cdiv(width, BLOCK))](x, baseline, alpha, out, row_start, batch, width,
                                                               BLOCK=BLOCK)
    return out


def accumulate_triton(acc: torch.Tensor, grads: torch.Tensor, weights: torch.Tensor, row_start: int) -> None:
    """Fused :func:`accumulate_torch` into a float32 ``acc``, in place, no temporaries."""
    _need_triton()
    if acc.dtype != torch.float32 or not acc.is_contiguous():
        raise ValueError("accumulate_triton needs a contiguous float32 accumulator")
    batch = acc.shape[0]
    width = acc[0].numel()
    w = weights.to(device=acc.device, dtype=torch.float32).contiguous()
    if width:
        _accumulate_kernel[(batch, triton.cdiv(width, BLOCK))](acc, grads.contiguous(), w, row_start, grads.shape[0],
                                                               batch, width, BLOCK=BLOCK)


def finalize_triton(x: torch.Tensor, baseline: torch.Tensor, acc: torch.Tensor, divisor: float, sum_last_dim: bool,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Fused :func:`finalize_torch`: ``(x - b) * acc / divisor``, optionally summed over the last dim."""
    _need_triton()
    x, baseline = x.contiguous(), baseline.contiguous()
    shape = x.shape[:-1] if sum_last_dim else x.shape
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=x.device)
    total = x.numel()
    if total:
        if sum_last_dim:
            inner = x.shape[-1]
            _finalize_kernel[(total // inner,)](x, baseline, acc, out, total, inner, 1.0 / divisor,
                                                SUM_LAST=True, BLOCK=min(BLOCK, triton.next_power_of_2(inner)))
        else:
            _finalize_kernel[(triton.cdiv(total, BLOCK),)](x, baseline, acc, out, total, 1, 1.0 / divisor,
                                                            SUM_LAST=False, BLOCK=BLOCK)
    return out
