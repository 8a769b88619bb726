"""Argument checks shared across fastattr: one rule, one message."""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fastattr.core.backend import BACKENDS
from fastattr.core.precision import PRECISIONS


def check_count(name: str, value: Any, *, optional: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an integer >= 1 (a bool is not one),
    or ``None`` where ``optional``."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}")


def check_steps(steps: Any, *, auto: bool = False) -> None:
    """Raise ``ValueError`` unless ``steps`` is an integer >= 1 (Python or numpy; a bool is not
    one), or ``"auto"`` where ``auto``."""
    if auto and isinstance(steps, str) and steps == "auto":
        return
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        wanted = "an integer >= 1 or 'auto'" if auto else "an integer >= 1"
        raise ValueError(f"steps must be {wanted}; got {steps!r}")


def check_tolerance(tolerance: Any) -> None:
    """Raise ``ValueError`` unless ``tolerance`` is ``None`` or a positive finite number."""
    if tolerance is not None:
        check_positive("tolerance", tolerance, hint=" (a relative error, e.g. 1e-3)")


def check_auto_options(steps: Any, tolerance: Any, method: str | None) -> None:
    """The options of one integrated-gradients call: ``steps`` an integer >= 1 or ``"auto"``;
    ``tolerance`` only with ``"auto"``; no explicit ``method`` with ``"auto"`` (it picks its points)."""
    check_steps(steps, auto=True)
    check_tolerance(tolerance)
    if tolerance is not None and steps != "auto":
        raise ValueError(f"tolerance applies only with steps='auto'; got steps={steps!r}")
    if steps == "auto" and method is not None:
        raise ValueError(f"method cannot be given with steps='auto' (the adaptive rule chooses its own path points); "
                         f"got method={method!r}")


def warn_renamed_target(batch: Mapping[str, Any], feature_keys: Sequence[str]) -> None:
    """Warn when a call carries PyHealth 2.0's ``class_index`` (renamed ``target_class_idx`` in 2.1.0):
    it would fall into the batch and be ignored, so the argmax class would be explained instead."""
    if "class_index" in batch and "class_index" not in feature_keys:
        warnings.warn("class_index is PyHealth 2.0's name; since PyHealth 2.1.0 (and in fastattr) the class to explain "
                      "is target_class_idx=. class_index is ignored: this call explains the argmax class, as "
                      "PyHealth 2.1.0 does", UserWarning, stacklevel=3)


def check_backend_name(backend: str | None) -> None:
    """Raise ``ValueError`` for a backend name outside ``BACKENDS`` (``None`` is allowed)."""
    if backend is not None and (not isinstance(backend, str) or backend not in BACKENDS):
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")


def check_precision(precision: str | None) -> None:
    """Raise ``ValueError`` for a name outside ``PRECISIONS`` (``None`` is allowed: the default)."""
    if precision is not None and (not isinstance(precision, str) or precision not in PRECISIONS):
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")


def check_auto_flag(name: str, value: Any) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is ``"auto"``, ``True`` or ``False``."""
    if not (value is True or value is False or (isinstance(value, str) and value == "auto")):
        raise ValueError(f"{name} must be 'auto', True or False; got {value!r}")


def check_pack_lengths(pack_lengths: Any) -> None:
    """Raise ``ValueError`` unless ``pack_lengths`` is ``"auto"``, ``True`` or ``False``."""
    check_auto_flag("pack_lengths", pack_lengths)


def check_percentages(percentages: Any) -> list[float]:
    """``percentages`` as a list, after checking it is a non-empty sequence of numbers in (0, 100]."""
    if isinstance(percentages, (int, float)) or not isinstance(percentages, Sequence) or not percentages or any(
            isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 100 for p in percentages):
        raise ValueError(f"percentages must be a non-empty list of numbers in (0, 100]; got {percentages!r}")
    return list(percentages)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")



def check_positive(name: str, value: Any, hint: str = "") -> None:
    """Raise ``ValueError`` naming ``name`` (and ``hint`` after it) unless ``value`` is a finite number > 0,
    Python's or numpy's (a bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(value)) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number{hint}; got {value!r}")


def check_non_negative(name: str, value: Any) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a finite number >= 0 (a bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")


def check_seed(name: str, value: Any) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is ``None`` or an integer >= 0."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0):
        raise ValueError(f"{name} must be None or an integer >= 0; got {value!r}")
