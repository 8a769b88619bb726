"""Removing the masked part of a feature, PyHealth 2.1.0's rules, for many masks of a sample at once.

Codes (integer values) are set to padding (0), whatever the strategy, and a sample that would be
left with no code keeps its first nonzero one (StageNet and RNNs need one position). Continuous
values: ``"zero"`` multiplies by ``1 - mask``, ``"mean"`` fills with the batch mean, ``"noise"``
with Gaussian noise scaled by the batch's standard deviation. The arithmetic is PyHealth's, term
for term, so the ablated inputs are bitwise the ones its per-percentage loop builds.
"""
from __future__ import annotations

import torch

from fastattr.core.checks import check_choice

STRATEGIES = ("zero", "mean", "noise")


def is_discrete(x: torch.Tensor) -> bool:
    """Whether ``x`` holds code ids (neither floating, complex nor bool)."""
    return not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool)


def ablate_rows(x: torch.Tensor, masks: torch.Tensor, strategy: str, batch: torch.Tensor) -> torch.Tensor:
    """``x`` (one feature's values of some samples, ``[V, ...]``) with ``masks`` (``[R, V, ...]``,
    broadcasting to ``x``; 1 = remove) applied: ``[R, V, ...]``. ``batch`` is the feature's whole
    padded batch, whose mean or standard deviation fills removed continuous values."""
    if is_discrete(x):
        return _ablate_codes(x, masks)
    check_choice("ablation_strategy", strategy, STRATEGIES)
    if strategy == "zero":
        return x * (1 - masks)
    if strategy == "mean":
        return x * (1 - masks) + batch.mean(dim=0, keepdim=True) * masks
    shape = torch.broadcast_shapes(x.shape, masks.shape)  # "noise"
    noise = torch.randn(shape, dtype=x.dtype, device=x.device) * batch.std()
    return x * (1 - masks) + noise * masks


def _ablate_codes(x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    ablated = torch.where(masks.bool(), torch.zeros_like(x), x)
    rows, samples = ablated.shape[:2]
    flat = ablated.reshape(rows, samples, -1)
    codes = x.expand(ablated.shape[1:]).reshape(samples, -1)
    present = codes != 0
    first = present.int().argmax(dim=1)  # the first nonzero code of each sample (row-major)
    emptied = ~flat.any(dim=2) & present.any(dim=1)
    if bool(emptied.any()):
        r, s = emptied.nonzero(as_tuple=True)
        flat[r, s, first[s]] = codes[s, first[s]]
    return flat.reshape(ablated.shape)
