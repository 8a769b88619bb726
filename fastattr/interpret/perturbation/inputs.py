"""What PyHealth's perturbation methods (SHAP, LIME) take from a call the same way: the batch's own
forward, the class explained per sample, and the baselines an absent position takes."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fastattr.interpret.base import CallOptions, Interpreter
from fastattr.interpret.features import FeatureBatch
from fastattr.interpret.interpretable import BaselineKeyError


def explained_classes(logits: torch.Tensor, target_class_idx: int | None) -> torch.Tensor:
    """PyHealth's target per sample (``_resolve_target_indices``): 0 for one logit, else
    ``target_class_idx`` for every sample or each sample's argmax. An index out of range fails
    where PyHealth's does, at the first logit gathered (a ``RuntimeError``)."""
    size = logits.shape[0]
    if logits.shape[-1] == 1:
        return torch.zeros(size, dtype=torch.long, device=logits.device)
    if target_class_idx is not None:
        return torch.full((size,), int(target_class_idx), dtype=torch.long, device=logits.device)
    return logits.argmax(dim=-1)


def perturbation_baselines(baseline: Mapping[str, torch.Tensor] | None, features: FeatureBatch,
                           device: torch.device) -> dict[str, torch.Tensor]:
    """PyHealth's default baselines (token id 1, continuous values 0.01, in each raw value's shape),
    or the caller's on ``device``, every feature key of the batch required."""
    if baseline is None:
        return {k: torch.ones_like(v) if features.layouts[k].token else torch.zeros_like(v) + 1e-2
                for k, v in features.values().items()}
    missing = [k for k in features.keys if k not in baseline]
    if missing:
        raise BaselineKeyError(f"baseline must give a tensor for every feature key of the batch; missing {missing}")
    return {k: torch.as_tensor(baseline[k]).to(device) for k in features.keys}


class PerturbationExplainer(Interpreter):
    """Base of the perturbation drop-ins: what their ``attribute`` calls start with."""

    def prepare(self, batch: Mapping[str, Any], target_class_idx: int | None,
                baseline: Mapping[str, torch.Tensor] | None) -> tuple[FeatureBatch, torch.Tensor, dict, CallOptions]:
        """The batch's features on the model's device, its forward as given (its predictions kept
        for the cohort runner and the evaluator), the class explained per sample and the baselines:
        ``(features, targets, baselines, options)``."""
        device, call = self.begin(batch, None, None, None)
        features = FeatureBatch.from_batch(self.model, batch, device=device)
        _, targets = self.forward_as_given(features, lambda logits: explained_classes(logits, target_class_idx))
        return features, targets, perturbation_baselines(baseline, features, device), call
