"""Argument checks shared across fastattr: one rule, one message."""
from __future__ import annotations

from typing import Any


def check_count(name: str, value: Any, *, optional: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an integer >= 1 (a bool is not one),
    or ``None`` where ``optional``."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
