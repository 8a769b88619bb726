"""Helpers every oracle restates for itself: the model's device, a feature's schema, PyHealth's target rule."""
from __future__ import annotations

from typing import Any

import torch


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _schema(model: Any, key: str) -> tuple[str, ...]:
    return tuple(model.dataset.input_processors[key].schema())


def _targets(target_class_idx: Any, logits: torch.Tensor) -> torch.Tensor:
    """Step 3 of PyHealth's IG: one column -> 0; a given class for every row; else the argmax."""
    batch = logits.shape[0]
    if logits.shape[-1] == 1:
        return torch.zeros(batch, dtype=torch.long, device=logits.device)
    if target_class_idx is None:
        return logits.argmax(dim=-1)
    t = torch.as_tensor(target_class_idx, device=logits.device).long().reshape(-1)
    return t.expand(batch) if t.numel() == 1 else t
