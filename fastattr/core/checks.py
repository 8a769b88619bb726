"""Argument checks shared across fastattr: one rule, one message."""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def check_count(name: str, value: Any, *, optional: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an integer >= 1 (a bool is not one),
    or ``None`` where ``optional``."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}")


def check_steps(steps: Any) -> None:
    """Raise ``ValueError`` unless ``steps`` is an integer >= 1 (Python or numpy; a bool is not one)."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1; got {steps!r}")


def warn_renamed_target(batch: Mapping[str, Any], feature_keys: Sequence[str]) -> None:
    """Warn when a call carries PyHealth 2.0's ``class_index`` (renamed ``target_class_idx`` in 2.1.0):
    it would fall into the batch and be ignored, so the argmax class would be explained instead."""
    if "class_index" in batch and "class_index" not in feature_keys:
        warnings.warn("class_index is PyHealth 2.0's name; since PyHealth 2.1.0 (and in fastattr) the class to explain "
                      "is target_class_idx=. class_index is ignored: this call explains the argmax class, as "
                      "PyHealth 2.1.0 does", UserWarning, stacklevel=3)
