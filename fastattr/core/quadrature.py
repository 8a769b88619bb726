"""Quadrature rules on [0, 1] for the integrated-gradients path integral."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fastattr.core.checks import check_choice, check_steps

# steps="auto" (fastattr.core.adaptive): the default relative tolerance. With it every patient of the
# demo's model and of PyHealth's Transformer was within 1e-2 of the converged reference and the
# median within 2e-3 (benchmarks/ig_accuracy.py; README and benchmarks/RESULTS.md).
AUTO_TOLERANCE = 5e-3
# Most path points one sample may take under steps="auto" (then one warning names the samples
# left above their tolerance).
AUTO_MAX_POINTS = 129


@dataclass(frozen=True)
class AutoSteps:
    """``steps="auto"``: the relative tolerance and the cap on path points per sample."""

    tolerance: float = AUTO_TOLERANCE
    max_points: int = AUTO_MAX_POINTS

METHODS = (
    "uniform",
    "riemann_left",
    "riemann_right",
    "riemann_middle",
    "riemann_trapezoid",
    "gausslegendre",
)


def quadrature(method: str, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(alphas, weights)`` as float64 tensors for ``steps`` subintervals.

    ``uniform`` is PyHealth's rule: the ``steps + 1`` points ``k / steps`` (both ends) with equal
    weights ``1 / (steps + 1)``. ``riemann_left/right/middle`` use ``steps`` points at the left ends,
    right ends or midpoints of the subintervals, weight ``1 / steps``. ``riemann_trapezoid`` uses the
    ``steps + 1`` points ``k / steps`` with the end weights halved. ``gausslegendre`` uses ``steps``
    Gauss-Legendre nodes mapped to [0, 1].

    Examples:
        >>> from fastattr import quadrature
        >>> alphas, weights = quadrature("uniform", 4)  # PyHealth's rule
        >>> alphas.tolist(), weights.tolist()
        ([0.0, 0.25, 0.5, 0.75, 1.0], [0.2, 0.2, 0.2, 0.2, 0.2])
        >>> quadrature("riemann_trapezoid", 4)[1].tolist()
        [0.125, 0.25, 0.25, 0.25, 0.125]
        >>> alphas, weights = quadrature("gausslegendre", 3)
        >>> len(alphas), round(float(weights.sum()), 12)
        (3, 1.0)
    """
    check_steps(steps)
    steps = int(steps)
    k = np.arange(steps + 1, dtype=np.float64)
    if method == "uniform":
        alphas = k / steps
        weights = np.full(steps + 1, 1.0 / (steps + 1))
    elif method == "riemann_left":
        alphas = k[:-1] / steps
        weights = np.full(steps, 1.0 / steps)
    elif method == "riemann_right":
        alphas = k[1:] / steps
        weights = np.full(steps, 1.0 / steps)
    elif method == "riemann_middle":
        alphas = (k[:-1] + 0.5) / steps
        weights = np.full(steps, 1.0 / steps)
    elif method == "riemann_trapezoid":
        alphas = k / steps
        weights = np.full(steps + 1, 1.0 / steps)
        weights[[0, -1]] *= 0.5
    elif method == "gausslegendre":
        nodes, w = np.polynomial.legendre.leggauss(steps)
        alphas = (nodes + 1.0) / 2.0
        weights = w / 2.0
    else:
        check_choice("method", method, METHODS)
    return torch.from_numpy(alphas), torch.from_numpy(weights)


def is_equal_weight(weights: torch.Tensor) -> bool:
    """True when every weight is the same (the sum can be divided once at the end)."""
    return bool(torch.all(weights == weights[0]))
