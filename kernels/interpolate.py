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
