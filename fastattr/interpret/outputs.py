"""Reading a model's output, in one place: PyHealth's models return ``{"logit": ..., "y_prob": ...}``."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def logits_of(out: Any) -> torch.Tensor:
    """The output's ``logit``, as ``[B, C]`` (a 1-D logit is one column)."""
    if not isinstance(out, Mapping) or "logit" not in out:
        got = sorted(out) if isinstance(out, Mapping) else type(out).__name__
        raise ValueError(f"the model's output must be a dict holding 'logit'; got {got}")
    logits = out["logit"]
    return logits.unsqueeze(1) if logits.dim() == 1 else logits


def reported_probabilities(out: Mapping[str, Any], logits: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """What an interpreter stores as its predictions: the model's ``y_prob`` as float32 ``[B, C]``
    (the logits where the model gives none), and whether it was ``y_prob``."""
    given = "y_prob" in out
    prob = out["y_prob"] if given else logits
    return prob.detach().float().reshape(logits.shape[0], -1), given
