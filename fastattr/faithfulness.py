"""Removal-based faithfulness as two functions: comprehensiveness and sufficiency of one batch.

The functional face of :mod:`fastattr.metrics` (PyHealth 2.1.0's ``pyhealth.metrics.interpretability``
with its default sample filter): for each percentage q, the top q% of each sample's attributions are
removed (comprehensiveness) or kept alone (sufficiency), and the drop of the predicted class's
probability is averaged over the percentages. Binary and multilabel models only score samples
predicted positive (probability >= ``threshold``); other samples score 0 and are marked invalid.
The same engine as :class:`fastattr.metrics.Evaluator` runs it. This is the one import path of the
two functions (``fastattr.tools.faithfulness`` is a deprecated alias of it).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fastattr.metrics.filters import threshold_sample_filter
from fastattr.metrics.metric import ComprehensivenessMetric, RemovalBasedMetric, SufficiencyMetric

PERCENTAGES = (1, 5, 10, 20, 50)


def _score(cls: type[RemovalBasedMetric], model: Any, inputs: dict[str, Any], attributions: dict[str, torch.Tensor],
           percentages: Sequence[float], ablation: str, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    was_training = model.training
    try:
        metric = cls(model, list(percentages), ablation, sample_filter=threshold_sample_filter(threshold))
        return metric.compute(inputs, attributions)
    finally:
        model.train(was_training)


def comprehensiveness(model: Any, inputs: dict[str, Any], attributions: dict[str, torch.Tensor], *,
                      percentages: Sequence[float] = PERCENTAGES, ablation: str = "zero",
                      threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean drop of the predicted class's probability when the top q% attributed inputs are
    removed; higher is more faithful. Returns ``(scores [B], valid [B])``."""
    return _score(ComprehensivenessMetric, model, inputs, attributions, percentages, ablation, threshold)


def sufficiency(model: Any, inputs: dict[str, Any], attributions: dict[str, torch.Tensor], *,
                percentages: Sequence[float] = PERCENTAGES, ablation: str = "zero",
                threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean drop of the predicted class's probability when only the top q% attributed inputs are
    kept; lower is more faithful. Returns ``(scores [B], valid [B])``."""
    return _score(SufficiencyMetric, model, inputs, attributions, percentages, ablation, threshold)
