"""Removal-based faithfulness of attributions: comprehensiveness and sufficiency.

The definitions are PyHealth 2.1.0's (``pyhealth.metrics.interpretability``) with its default
sample filter: for each percentage q, the top q% of each sample's attributions (quantile with
"higher" interpolation; when all attributions tie, the first ``int(n * q / 100)`` positions, at
least one) are removed (comprehensiveness) or kept alone (sufficiency), and the drop
of the predicted class's probability is averaged over the percentages. Removing a code sets it
to padding (0), keeping at least the sample's first code; continuous values are zeroed (or set
to the batch mean, or to noise). Binary models only score samples predicted positive
(probability >= ``threshold``); other samples score 0 and are marked invalid.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fastattr.interpret.features import FeatureLayout

PERCENTAGES = (1, 5, 10, 20, 50)


def _classifier_type(model: Any) -> str:
    schema = getattr(getattr(model, "dataset", None), "output_schema", None) or {}
    mode = next(iter(schema.values()), "multiclass")
    return mode.lower() if isinstance(mode, str) else getattr(mode, "__name__", "multiclass").lower()


def _probabilities(model: Any, inputs: dict[str, Any], kind: str) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    if "y_prob" in out:
        prob = out["y_prob"]
    else:
        logits = out["logit"]
        prob = torch.sigmoid(logits) if kind in ("binary", "multilabel") else torch.softmax(logits, dim=-1)
    return prob.unsqueeze(-1) if prob.dim() == 1 else prob


def top_masks(attributions: dict[str, torch.Tensor], percentage: float) -> dict[str, torch.Tensor]:
    """Per sample, 1 where the attribution is in the top ``percentage`` percent, else 0."""
    masks = {}
    for key, attr in attributions.items():
        flat = attr.detach().reshape(attr.shape[0], -1).float()
        mask = torch.zeros_like(flat)
        for i, row in enumerate(flat):
            if row.min() == row.max():
                mask[i, : max(1, int(row.numel() * percentage / 100.0))] = 1.0
            else:
                threshold = torch.quantile(row, 1.0 - percentage / 100.0, interpolation="higher")
                mask[i] = (row >= threshold).float()
        masks[key] = mask.reshape(attr.shape)
    return masks


def _ablate_codes(codes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    ablated = torch.where(mask.bool(), torch.zeros_like(codes), codes)
    for b in range(ablated.shape[0]):
        if not ablated[b].any():
            nonzero = (codes[b] != 0).nonzero()
            if len(nonzero):
                first = tuple(nonzero[0])
                ablated[b][first] = codes[b][first]
    return ablated


def _ablate_values(x: torch.Tensor, mask: torch.Tensor, strategy: str) -> torch.Tensor:
    if not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        return _ablate_codes(x, mask)
    if strategy == "zero":
        return x * (1 - mask)
    if strategy == "mean":
        return x * (1 - mask) + x.mean(dim=0, keepdim=True) * mask
    if strategy == "noise":
        return x * (1 - mask) + torch.randn_like(x) * x.std() * mask
    raise ValueError(f"ablation must be one of zero, mean, noise; got {strategy!r}")


def ablate(inputs: dict[str, Any], masks: dict[str, torch.Tensor], strategy: str = "zero", *,
           model: Any = None) -> dict[str, Any]:
    """Inputs with the masked positions removed. A tuple feature's value is found by its schema,
    so tuple features need ``model`` (for ``model.dataset.input_processors``)."""
    out = {}
    for key, x in inputs.items():
        if key not in masks or not isinstance(x, (torch.Tensor, tuple)):
            out[key] = x
        elif isinstance(x, tuple):
            if model is None:
                raise TypeError(f"inputs[{key!r}] is a tuple feature: ablate needs model= to find its value slot")
            layout = FeatureLayout.of(model, key)
            out[key] = layout.replace_value(x, _ablate_values(layout.value(x), masks[key], strategy))
        else:
            out[key] = _ablate_values(x, masks[key], strategy)
    return out


def _removal_score(model: Any, inputs: dict[str, Any], attributions: dict[str, torch.Tensor], keep: bool,
                   percentages: Sequence[float], ablation: str, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    if not percentages or any(not 0 < p <= 100 for p in percentages):
        raise ValueError(f"percentages must be non-empty values in (0, 100]; got {list(percentages)}")
    unknown = set(attributions) - set(inputs)
    if unknown:
        raise ValueError(f"attributions name keys that are not inputs: {sorted(unknown)}")
    was_training = model.training
    model.eval()
    try:
        kind = _classifier_type(model)
        prob = _probabilities(model, inputs, kind)
        target = prob.argmax(dim=-1)
        base = prob.gather(1, target[:, None]).squeeze(1)
        valid = base >= threshold if kind in ("binary", "multilabel") else torch.ones_like(base, dtype=torch.bool)
        base = torch.where(valid, base, torch.zeros_like(base))
        target = torch.where(valid, target, torch.zeros_like(target))
        total = torch.zeros_like(base)
        for q in percentages:
            masks = top_masks(attributions, q)
            if keep:
                masks = {k: 1 - m for k, m in masks.items()}
            ablated = _probabilities(model, ablate(inputs, masks, ablation, model=model), kind).gather(1, target[:, None]).squeeze(1)
            total += torch.where(valid, base - ablated, torch.zeros_like(base))
    finally:
        model.train(was_training)
    return total / len(percentages), valid


def comprehensiveness(model: Any, inputs: dict[str, Any], attributions: dict[str, torch.Tensor], *,
                      percentages: Sequence[float] = PERCENTAGES, ablation: str = "zero",
                      threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean drop of the predicted class's probability when the top q% attributed inputs are
    removed; higher is more faithful. Returns ``(scores [B], valid [B])``."""
    return _removal_score(model, inputs, attributions, False, percentages, ablation, threshold)


def sufficiency(model: Any, inputs: dict[str, Any], attributions: dict[str, torch.Tensor], *,
                percentages: Sequence[float] = PERCENTAGES, ablation: str = "zero",
                threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean drop of the predicted class's probability when only the top q% attributed inputs are
    kept; lower is more faithful. Returns ``(scores [B], valid [B])``."""
    return _removal_score(model, inputs, attributions, True, percentages, ablation, threshold)
