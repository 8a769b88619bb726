"""PyHealth 2.1.0's removal metrics (comprehensiveness, sufficiency), one patient and percentage at a time."""
from __future__ import annotations

from typing import Any

import torch

from fastattr.loop.common import _schema


def _probs(model: Any, inputs: dict, kind: str,
           target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PyHealth's get_model_predictions, less the filter: the explained class's probability and the class."""
    with torch.no_grad():
        out = model(**inputs)
    if "y_prob" in out:
        prob = out["y_prob"]
    elif kind in ("binary", "multilabel"):
        prob = torch.sigmoid(out["logit"])
    else:
        prob = torch.softmax(out["logit"], dim=-1)
    prob = prob.unsqueeze(-1) if prob.dim() == 1 else prob
    target = prob.argmax(dim=-1) if target is None else target
    return prob.gather(-1, target.unsqueeze(-1)).squeeze(-1), target


def _top_mask(attr: torch.Tensor, percentage: float) -> torch.Tensor:
    mask = torch.zeros_like(attr)
    for i in range(attr.shape[0]):
        row = attr[i].flatten()
        if row.min() == row.max():
            flat = torch.zeros_like(row)
            flat[:max(1, int(row.numel() * percentage / 100.0))] = 1.0
        else:
            flat = (row >= torch.quantile(row, 1.0 - percentage / 100.0, interpolation="higher")).float()
        mask[i] = flat.reshape(attr[i].shape)
    return mask


def _remove(model: Any, key: str, x: Any, mask: torch.Tensor, strategy: str) -> Any:
    """One feature with the masked positions removed (a tuple's value slot by its schema)."""
    if isinstance(x, tuple):
        slot = _schema(model, key).index("value")
        return x[:slot] + (_remove(model, key, x[slot], mask, strategy),) + x[slot + 1:]
    if not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        out = torch.where(mask.bool(), torch.zeros_like(x), x)
        for b in range(out.shape[0]):
            if not out[b].any():
                nonzero = (x[b] != 0).nonzero()
                if len(nonzero):
                    out[b][tuple(nonzero[0])] = x[b][tuple(nonzero[0])]
        return out
    if strategy == "zero":
        return x * (1 - mask)
    return x * (1 - mask) + x.mean(dim=0, keepdim=True) * mask  # "mean"


def loop_removal_scores(model: Any, inputs: dict, attributions: dict, *, sufficiency: bool, kind: str,
                        sample_filter: Any, percentages: list[float], strategy: str = "zero"
                        ) -> tuple[dict[float, torch.Tensor], torch.Tensor]:
    """PyHealth 2.1.0's comprehensiveness (or sufficiency) of one batch, one padded forward per
    percentage: ``({percentage: drops [B]}, sample classes [B])`` (1 positive, -1 negative, 0 ignore)."""
    prob, target = _probs(model, inputs, kind)
    classes = sample_filter(prob, kind)
    prob[classes == 0], target[classes == 0] = 0.0, 0
    negative = classes == -1
    signed = {k: torch.where(negative.view(-1, *[1] * (a.dim() - 1)), -a, a) for k, a in attributions.items()}
    out = {}
    for percentage in percentages:
        ablated = dict(inputs)
        for key, attr in signed.items():
            mask = _top_mask(attr, percentage)
            ablated[key] = _remove(model, key, inputs[key], 1 - mask if sufficiency else mask, strategy)
        after, _ = _probs(model, ablated, kind, target)
        after[classes == 0] = 0.0
        drop = torch.zeros(prob.shape[0])
        for b in range(prob.shape[0]):
            if classes[b] != 0:
                drop[b] = -prob[b] + after[b] if negative[b] else prob[b] - after[b]
        out[percentage] = drop
    return out, classes
