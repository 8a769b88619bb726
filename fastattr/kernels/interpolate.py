"""Integrated-gradients path construction and gradient reduction.

Rows of a chunk are laid out step-major: global row ``r`` is sample ``r % B`` at path point
``r // B``. A chunk is the row range ``[row_start, row_start + rows)``, so chunks need not hold
whole steps and results do not depend on how the rows are split.
"""
from __future__ import annotations

import torch

from ._triton import MAX_GRID_X, flat_grid, need_triton, tl, triton


def _row_index(batch: int, row_start: int, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.arange(row_start, row_start + rows, device=device)
    return r % batch, r // batch


def interpolate_torch(x: torch.Tensor, baseline: torch.Tensor, alphas: torch.Tensor, row_start: int,
                      rows: int) -> torch.Tensor:
    """Rows ``b + alpha * (x - b)`` of the path, ``[rows, *x.shape[1:]]``, in ``x.dtype``.

    ``baseline`` has the shape of ``x``; ``alphas`` holds every path point of the call. A chunk of
    whole path points broadcasts the batch over its points (two passes over the rows, no gathered
    copies of ``x`` and ``baseline``); the values are the same either way, element for element.
    """
    batch = x.shape[0]
    if row_start % batch == 0 and rows % batch == 0:
        first = row_start // batch
        alpha = alphas.to(device=x.device, dtype=x.dtype)[first:first + rows // batch]
        out = alpha.view(-1, *([1] * x.dim())) * (x - baseline).unsqueeze(0)
        out += baseline.unsqueeze(0)
        return out.view(rows, *x.shape[1:])
    sample, step = _row_index(batch, row_start, rows, x.device)
    xs = x.index_select(0, sample)
    bs = baseline.index_select(0, sample)
    alpha = alphas.to(device=x.device, dtype=x.dtype).index_select(0, step)
    alpha = alpha.view(-1, *([1] * (x.dim() - 1)))
    return bs + alpha * (xs - bs)


def accumulate_torch(acc: torch.Tensor, grads: torch.Tensor, weights: torch.Tensor, row_start: int) -> None:
    """``acc[sample] += weights[step] * grads[row]`` over the chunk's rows, in place (weights that are
    all 1 on the CPU multiply nothing: the same values, one pass fewer)."""
    sample, step = _row_index(acc.shape[0], row_start, grads.shape[0], acc.device)
    rows = grads.to(acc.dtype)
    if not (weights.device.type == "cpu" and bool(torch.all(weights == 1))):
        w = weights.to(device=acc.device, dtype=acc.dtype).index_select(0, step)
        rows = rows * w.view(-1, *([1] * (acc.dim() - 1)))
    acc.index_add_(0, sample, rows)


def finalize_torch(x: torch.Tensor, baseline: torch.Tensor, acc: torch.Tensor, divisor: float,
                   sum_last_dim: bool) -> torch.Tensor:
    """Attribution ``(x - b) * (acc / divisor)``, summed over the last dim when asked."""
    attr = (x - baseline).to(acc.dtype) * (acc / divisor)
    return attr.sum(dim=-1) if sum_last_dim else attr


def interpolate_rows_torch(x: torch.Tensor, baseline: torch.Tensor, samples: torch.Tensor,
                           alphas: torch.Tensor) -> torch.Tensor:
    """Listed rows: row ``r`` is ``b[samples[r]] + alphas[r] * (x - b)[samples[r]]``, ``[R, *x.shape[1:]]``."""
    xs, bs = x.index_select(0, samples), baseline.index_select(0, samples)
    alpha = alphas.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return bs + alpha * (xs - bs)


def density_torch(x: torch.Tensor, baseline: torch.Tensor, samples: torch.Tensor, grads: torch.Tensor,
                  sum_last_dim: bool) -> torch.Tensor:
    """Listed rows' attribution densities: ``(x - b)[samples[r]] * grads[r]`` (float32 or wider),
    summed over the last dim when asked. Integrated gradients is a weighted sum of them."""
    dtype = torch.promote_types(grads.dtype, torch.float32)
    diff = (x.index_select(0, samples) - baseline.index_select(0, samples)).to(dtype)
    out = diff * grads.to(dtype)
    return out.sum(dim=-1) if sum_last_dim else out


MAX_BLOCK = 1024
ACCUMULATE_STAGES = 3


def _block(width: int) -> int:
    """Elements per program along a row: the row itself when short (tiny features waste no
    lanes), else 1024."""
    return min(MAX_BLOCK, max(16, triton.next_power_of_2(width)))


def _warps(block: int) -> int:
    return max(1, min(4, block // 256))


if triton is not None:

    # Chunk offsets change every call: specialising on them (== 1, % 16) would recompile.
    @triton.jit(do_not_specialize=["row_start"])
    def _interpolate_kernel(x_ptr, b_ptr, alpha_ptr, out_ptr, row_start, batch, width, col_blocks,
                            BLOCK: tl.constexpr):
        # Flat grid over (chunk row, column block): CUDA's y/z limit never applies.
        pid = tl.program_id(0)
        local = (pid // col_blocks).to(tl.int64)
        cols = (pid % col_blocks).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < width
        row = row_start + local
        sample = row % batch
        alpha = tl.load(alpha_ptr + row // batch)
        x = tl.load(x_ptr + sample * width + cols, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + sample * width + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + local * width + cols, (b + alpha * (x - b)).to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit(do_not_specialize=["row_start", "rows"])
    def _accumulate_kernel(acc_ptr, g_ptr, w_ptr, row_start, rows, batch, width, row_stride, col_blocks,
                           BLOCK: tl.constexpr, STAGES: tl.constexpr):
        # One program owns one sample's slice of the accumulator and walks that sample's rows of
        # the chunk in step order: no atomics, the same sum order as the torch reference. The
        # walk advances pointers by ``row_stride`` (batch * width; no division inside the loop),
        # and the loop is software-pipelined (STAGES rows' loads in flight through cp.async).
        pid = tl.program_id(0)
        sample = (pid // col_blocks).to(tl.int64)
        cols = (pid % col_blocks).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < width
        start = row_start.to(tl.int64)
        first = start + (sample - start % batch + batch) % batch
        count = (start + rows - first + batch - 1) // batch
        w_here = w_ptr + first // batch
        g_here = g_ptr + (first - start) * width + cols
        acc = tl.load(acc_ptr + sample * width + cols, mask=ok, other=0.0)
        for _ in tl.range(0, count, num_stages=STAGES):
            g = tl.load(g_here, mask=ok, other=0.0).to(tl.float32)
            acc += tl.load(w_here) * g
            w_here += 1
            g_here += row_stride
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


if triton is not None:

    @triton.jit
    def _interpolate_rows_kernel(x_ptr, b_ptr, sample_ptr, alpha_ptr, out_ptr, width, col_blocks,
                                 BLOCK: tl.constexpr):
        # Flat grid over (listed row, column block); each row reads its own sample and alpha.
        pid = tl.program_id(0)
        row = (pid // col_blocks).to(tl.int64)
        cols = (pid % col_blocks).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < width
        sample = tl.load(sample_ptr + row).to(tl.int64)
        alpha = tl.load(alpha_ptr + row)
        x = tl.load(x_ptr + sample * width + cols, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + sample * width + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * width + cols, (b + alpha * (x - b)).to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _density_kernel(x_ptr, b_ptr, sample_ptr, g_ptr, out_ptr, positions, inner, col_blocks,
                        SUM_LAST: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        if SUM_LAST:
            # one program per (row, position): reduce that position's ``inner`` values
            row = pid // positions
            source = (tl.load(sample_ptr + row).to(tl.int64) * positions + pid % positions) * inner
            total = tl.zeros((BLOCK,), dtype=tl.float32)
            for start in range(0, inner, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                ok = cols < inner
                x = tl.load(x_ptr + source + cols, mask=ok, other=0.0).to(tl.float32)
                b = tl.load(b_ptr + source + cols, mask=ok, other=0.0).to(tl.float32)
                g = tl.load(g_ptr + pid * inner + cols, mask=ok, other=0.0).to(tl.float32)
                total += (x - b) * g
            tl.store(out_ptr + pid, tl.sum(total, axis=0))
        else:
            # one program per (row, column block) of a row of ``inner`` values
            row = pid // col_blocks
            cols = (pid % col_blocks) * BLOCK + tl.arange(0, BLOCK)
            ok = cols < inner
            source = tl.load(sample_ptr + row).to(tl.int64) * inner
            x = tl.load(x_ptr + source + cols, mask=ok, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + source + cols, mask=ok, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + row * inner + cols, mask=ok, other=0.0).to(tl.float32)
            tl.store(out_ptr + row * inner + cols, (x - b) * g, mask=ok)


def interpolate_triton(x: torch.Tensor, baseline: torch.Tensor, alphas: torch.Tensor, row_start: int, rows: int,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """Fused :func:`interpolate_torch`: every row of the chunk in one launch (float32 math)."""
    need_triton("IG")
    batch = x.shape[0]
    x, baseline = x.contiguous(), baseline.contiguous()
    width = x[0].numel()
    if out is None:
        out = torch.empty((rows, *x.shape[1:]), dtype=x.dtype, device=x.device)
    alpha = alphas.to(device=x.device, dtype=torch.float32).contiguous()
    if rows and width:
        block = _block(width)
        col_blocks = triton.cdiv(width, block)
        # A chunk too large for one grid (over 2^31 blocks) is launched in row ranges.
        per_launch = max(1, MAX_GRID_X // col_blocks)
        flat = out.view(rows, width)
        for first in range(0, rows, per_launch):
            count = min(per_launch, rows - first)
            _interpolate_kernel[flat_grid(count * col_blocks)](
                x, baseline, alpha, flat[first:first + count], row_start + first, batch, width, col_blocks,
                BLOCK=block, num_warps=_warps(block))
    return out


def accumulate_triton(acc: torch.Tensor, grads: torch.Tensor, weights: torch.Tensor, row_start: int) -> None:
    """Fused :func:`accumulate_torch` into a float32 ``acc``, in place, no temporaries."""
    need_triton("IG")
    if acc.dtype != torch.float32 or not acc.is_contiguous():
        raise ValueError("accumulate_triton needs a contiguous float32 accumulator")
    batch = acc.shape[0]
    width = acc[0].numel()
    w = weights.to(device=acc.device, dtype=torch.float32).contiguous()
    if width and grads.shape[0]:
        block = _block(width)
        col_blocks = triton.cdiv(width, block)
        _accumulate_kernel[flat_grid(batch * col_blocks)](acc, grads.contiguous(), w, row_start, grads.shape[0],
                                                          batch, width, batch * width, col_blocks, BLOCK=block,
                                                          num_warps=_warps(block), STAGES=ACCUMULATE_STAGES)


def finalize_triton(x: torch.Tensor, baseline: torch.Tensor, acc: torch.Tensor, divisor: float, sum_last_dim: bool,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Fused :func:`finalize_torch`: ``(x - b) * acc / divisor``, optionally summed over the last dim."""
    need_triton("IG")
    x, baseline = x.contiguous(), baseline.contiguous()
    shape = x.shape[:-1] if sum_last_dim else x.shape
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=x.device)
    total = x.numel()
    if total:
        if sum_last_dim:
            inner = x.shape[-1]
            block = min(MAX_BLOCK, triton.next_power_of_2(inner))
            _finalize_kernel[flat_grid(total // inner)](x, baseline, acc, out, total, inner, 1.0 / divisor,
                                                        SUM_LAST=True, BLOCK=block, num_warps=_warps(block))
        else:
            _finalize_kernel[flat_grid(triton.cdiv(total, MAX_BLOCK))](x, baseline, acc, out, total, 1, 1.0 / divisor,
                                                                       SUM_LAST=False, BLOCK=MAX_BLOCK)
    return out


def interpolate_rows_triton(x: torch.Tensor, baseline: torch.Tensor, samples: torch.Tensor,
                            alphas: torch.Tensor) -> torch.Tensor:
    """Fused :func:`interpolate_rows_torch` (float32 math), one launch."""
    need_triton("IG")
    x, baseline = x.contiguous(), baseline.contiguous()
    rows, width = samples.shape[0], x[0].numel()
    out = torch.empty((rows, *x.shape[1:]), dtype=x.dtype, device=x.device)
    if rows and width:
        block = _block(width)
        col_blocks = triton.cdiv(width, block)
        _interpolate_rows_kernel[flat_grid(rows * col_blocks)](
            x, baseline, samples.to(torch.int64).contiguous(), alphas.to(device=x.device, dtype=torch.float32)
            .contiguous(), out, width, col_blocks, BLOCK=block, num_warps=_warps(block))
    return out


def density_triton(x: torch.Tensor, baseline: torch.Tensor, samples: torch.Tensor, grads: torch.Tensor,
                   sum_last_dim: bool) -> torch.Tensor:
    """Fused :func:`density_torch` into float32, one launch."""
    need_triton("IG")
    x, baseline, grads = x.contiguous(), baseline.contiguous(), grads.contiguous()
    rows = samples.shape[0]
    shape = (rows, *x.shape[1:-1]) if sum_last_dim else (rows, *x.shape[1:])
    out = torch.empty(shape, dtype=torch.float32, device=x.device)
    index = samples.to(torch.int64).contiguous()
    if out.numel():
        if sum_last_dim:
            inner = x.shape[-1]
            positions = x[0].numel() // inner
            block = min(MAX_BLOCK, triton.next_power_of_2(inner))
            _density_kernel[flat_grid(rows * positions)](x, baseline, index, grads, out, positions, inner, 1,
                                                         SUM_LAST=True, BLOCK=block, num_warps=_warps(block))
        else:
            inner = x[0].numel()
            block = _block(inner)
            col_blocks = triton.cdiv(inner, block)
            _density_kernel[flat_grid(rows * col_blocks)](x, baseline, index, grads, out, 1, inner, col_blocks,
                                                          SUM_LAST=False, BLOCK=block, num_warps=_warps(block))
    return out
