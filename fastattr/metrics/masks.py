"""Top-q% masks of attributions for every percentage at once, PyHealth 2.1.0's rule vectorised.

Per sample and feature, over the whole (padded) row of attributions flattened: the mask of the top
q% is ``attr >= quantile(row, 1 - q/100, interpolation="higher")``; when every value of the row ties,
the first ``max(1, int(n * q / 100))`` positions instead. One ``torch.quantile`` over all rows and
all percentages gives the thresholds PyHealth's per-sample loop computes (the same function, the
same float rounding of ``q`` in the attributions' dtype).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

# torch.quantile refuses inputs of more elements than this; larger batches are split by rows.
QUANTILE_MAX_ELEMENTS = 2 ** 24


def top_masks(attr: torch.Tensor, percentages: Sequence[float]) -> torch.Tensor:
    """``[P, B, *attr.shape[1:]]`` masks (in ``attr``'s dtype, 1 for the top ``percentages[p]``
    percent of sample b's attributions, else 0)."""
    batch = attr.shape[0]
    flat = attr.detach().reshape(batch, -1)
    n = flat.shape[1]
    quantiles = torch.tensor([1.0 - p / 100.0 for p in percentages], dtype=flat.dtype, device=flat.device)
    rows = max(1, QUANTILE_MAX_ELEMENTS // max(n, 1))
    thresholds = torch.cat([torch.quantile(flat[i:i + rows], quantiles, dim=1, interpolation="higher")
                            for i in range(0, batch, rows)], dim=1) if n else flat.new_zeros(len(percentages), batch)
    masks = (flat.unsqueeze(0) >= thresholds.unsqueeze(-1)).to(flat.dtype)
    tied = flat.amin(dim=1) == flat.amax(dim=1) if n else torch.zeros(batch, dtype=torch.bool, device=flat.device)
    if bool(tied.any()):
        counts = torch.tensor([max(1, int(n * p / 100.0)) for p in percentages], device=flat.device)
        first = (torch.arange(n, device=flat.device) < counts[:, None]).to(flat.dtype)  # [P, n]
        masks = torch.where(tied[None, :, None], first[:, None, :], masks)
    return masks.reshape(len(percentages), *attr.shape)
