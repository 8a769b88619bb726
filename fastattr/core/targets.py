"""One class index per sample to explain, by PyHealth's rules."""
from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch


def target_tensor(target: Any, batch: int, device: torch.device) -> torch.Tensor:
    """``target`` as one class index per sample: any integral scalar (Python int, numpy integer,
    0-dim integer tensor) for every sample, or a 1-D integer tensor, array or sequence of one class
    per sample. Bools and floats are refused."""
    if isinstance(target, (bool, np.bool_)):
        raise TypeError(f"target_class_idx must be an integer class index, not a bool; got {target!r}")
    if isinstance(target, numbers.Integral):
        return torch.full((batch,), int(target), dtype=torch.long, device=device)
    if isinstance(target, (np.ndarray, list, tuple)):
        try:
            array = np.asarray(target)
        except ValueError:
            array = np.asarray(target, dtype=object)
        if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"target_class_idx must hold integer class indices; got {array.dtype} values")
        target = torch.as_tensor(array)
    if not isinstance(target, torch.Tensor):
        raise TypeError("target_class_idx must be an integer, one integer per sample (tensor, array or list) or "
                        f"None; got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target_class_idx tensor must hold integers; got dtype {target.dtype}")
    if target.dim() > 1:
        raise ValueError(f"target_class_idx must be a scalar or 1-D (one class per sample); got shape "
                         f"{tuple(target.shape)}")
    t = target.reshape(-1).to(device=device, dtype=torch.long)
    if t.numel() == 1:
        return t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"target_class_idx must hold one class per sample ({batch}); got {target.numel()}")
    return t


def resolve_targets(target: Any, logits: torch.Tensor | None, batch: int,
                    num_classes: int, device: torch.device) -> torch.Tensor:
    """One class index per sample, PyHealth's rules: a single logit column always targets 0;
    otherwise ``target`` (an int or one index per sample), else the argmax of ``logits``."""
    if num_classes == 1:
        return torch.zeros(batch, dtype=torch.long, device=device)
    if target is None:
        if logits is None:
            raise ValueError("target is None and no logits were given to take the argmax of")
        return logits.argmax(dim=-1).to(device)
    t = target_tensor(target, batch, device)
    if bool(((t < 0) | (t >= num_classes)).any()):
        bad = t[(t < 0) | (t >= num_classes)][0].item()
        raise ValueError(f"target_class_idx {bad} is out of range for {num_classes} classes")
    return t.contiguous()
