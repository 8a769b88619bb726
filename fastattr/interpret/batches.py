"""A dataloader batch as a whole: its size, some of its samples, and its tensors on a device.

Everything a batch holds (features, labels, ids, times) is handled alike here; what a feature's
tuple means is :mod:`fastattr.interpret.features`' concern.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def batch_size(batch: Mapping[str, Any]) -> int:
    """Samples in a dataloader batch: the first dim of its first tensor (or a tuple's first
    tensor), else the length of its first list."""
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
        if isinstance(value, tuple) and value and isinstance(value[0], torch.Tensor):
            return value[0].shape[0]
        if isinstance(value, list):
            return len(value)
    raise ValueError("cannot tell the batch size: the batch holds no tensor or list")


def select_samples(batch: Mapping[str, Any], rows: slice | torch.Tensor, size: int | None = None) -> dict[str, Any]:
    """The samples ``rows`` (a slice, or a LongTensor of positions) of a whole dataloader batch:
    every tensor and per-sample list (ids) whose first dim is the batch size (``size``, by
    default found from the batch), inside tuples too; anything else unchanged."""
    if size is None:
        size = batch_size(batch)
    picks = rows.tolist() if isinstance(rows, torch.Tensor) else None

    def cut(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size:
            return value[rows] if picks is None else value.index_select(0, rows.to(value.device))
        if _per_sample(value, size):
            return value[rows] if picks is None else type(value)(value[i] for i in picks)
        if isinstance(value, tuple):
            return tuple(cut(v) for v in value)
        return value
    return {k: cut(v) for k, v in batch.items()}


def _per_sample(value: Any, size: int) -> bool:
    """A list of one item per sample (ids), or a tuple of them; a tuple holding a tensor or ``None``
    is a feature's slots (StageNet's ``(None, values)``), never samples."""
    if not isinstance(value, (list, tuple)) or len(value) != size:
        return False
    if isinstance(value, tuple):
        return not any(v is None or isinstance(v, torch.Tensor) for v in value)
    return not (value and isinstance(value[0], torch.Tensor))


def move_batch(batch: Mapping[str, Any], device: torch.device | str, pinned: bool = False) -> dict[str, Any]:
    """A dataloader batch with its tensors (also inside tuples) on ``device``; anything else as it is.
    With ``pinned``, host tensors are pinned first and copied without blocking (the caller orders
    the copy before any use)."""
    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if pinned and value.device.type == "cpu":
                return value.pin_memory().to(device, non_blocking=True)
            return value.to(device)
        if isinstance(value, tuple):
            return tuple(move(v) for v in value)
        return value
    return {k: move(v) for k, v in batch.items()}
