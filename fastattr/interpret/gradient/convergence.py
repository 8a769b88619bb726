"""What one integrated-gradients call reports about its path per sample: the points each sample
took and, for ``steps="auto"``, its estimated relative error; the warning naming the samples that
the cap stopped above their tolerance."""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fastattr.core.quadrature import AutoSteps
from fastattr.interpret.lengths import place_rows

# Samples a warning names (the rest are counted).
NAMED = 10


@dataclass(frozen=True)
class StepsReport:
    """Per sample: path points taken (``[B]`` int64) and the estimated relative error (``[B]``
    float64, ``None`` for a fixed rule)."""

    points: torch.Tensor
    error: torch.Tensor | None

    @classmethod
    def of(cls, result: Any, size: int, rule_points: int) -> StepsReport:
        """From a core result (``steps="auto"``'s own counts, else the fixed rule's for every sample)."""
        if result.points is None:
            return cls(torch.full((size,), rule_points, dtype=torch.long), None)
        return cls(result.points.cpu().long(), result.error.cpu())

    @classmethod
    def placed(cls, size: int, parts: list[tuple[torch.Tensor, StepsReport]]) -> StepsReport:
        """Length groups' reports back in batch order."""
        points = place_rows(size, [(i.cpu(), r.points) for i, r in parts])
        errors = None if parts[0][1].error is None else place_rows(size, [(i.cpu(), r.error) for i, r in parts])
        return cls(points, errors)


def warn_unconverged(report: StepsReport, auto: AutoSteps, patient_ids: Sequence[Any] | None = None) -> None:
    """One warning naming the samples (batch positions, and patient ids where the batch has them)
    whose estimate stayed above the tolerance at the cap on points."""
    above = (report.error > auto.tolerance).nonzero().flatten().tolist()
    if not above:
        return
    ids = patient_ids if isinstance(patient_ids, (list, tuple)) and len(patient_ids) == len(report.error) else None
    named = ", ".join(f"{i}" + (f" ({ids[i]})" if ids is not None else "") + f": {report.error[i]:.1e}"
                      for i in above[:NAMED])
    more = f" and {len(above) - NAMED} more" if len(above) > NAMED else ""
    warnings.warn(f"steps='auto': {len(above)} sample(s) stayed above the tolerance {auto.tolerance:g} at the cap of "
                  f"{auto.max_points} path points per sample (sample: estimated relative error) {named}{more}; their "
                  "attributions are the best the cap allowed (ig.last_error_estimates has every sample's estimate)",
                  UserWarning, stacklevel=3)
