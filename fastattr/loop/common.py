"""Helpers every oracle restates for itself: the model's device, a feature's schema and inputs, PyHealth's
target rule."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _schema(model: Any, key: str) -> tuple[str, ...]:
    return tuple(model.dataset.input_processors[key].schema())


def _targets(target_class_idx: Any, logits: torch.Tensor) -> torch.Tensor:
    """Step 3 of PyHealth's IG: one column -> 0; a given class for every row; else the argmax."""
    batch = logits.shape[0]
    if logits.shape[-1] == 1:
        return torch.zeros(batch, dtype=torch.long, device=logits.device)
    if target_class_idx is None:
        return logits.argmax(dim=-1)
    t = torch.as_tensor(target_class_idx, device=logits.device).long().reshape(-1)
    return t.expand(batch) if t.numel() == 1 else t


def _feature_inputs(model: Any, batch: dict, device: torch.device) -> tuple[dict, dict]:
    """The feature tuples (PyHealth's mask appended where the schema has none) and their values, in
    ``model.feature_keys`` order."""
    inputs, values = {}, {}
    for key in model.feature_keys:
        if key not in batch:
            continue
        parts = (batch[key],) if isinstance(batch[key], torch.Tensor) else tuple(batch[key])
        parts = tuple(p.to(device) if isinstance(p, torch.Tensor) else p for p in parts)
        schema = _schema(model, key)
        value = parts[schema.index("value")]
        if "mask" not in schema:
            token = model.dataset.input_processors[key].is_token()
            mask = (value != 0) if token or value.dim() < 3 else (value.abs().sum(-1) != 0)
            parts = (*parts, mask.int())
        inputs[key], values[key] = parts, value
    return inputs, values


def _gating_setup(model: Any, batch: dict, baseline: dict | None, target_class_idx: Any,
                  use_embeddings: bool) -> SimpleNamespace:
    """What PyHealth's perturbation methods start from: the inputs and raw values, the targets of the
    batch's own forward, token-ness, the baseline (token id 1, values 0.01 by default), the embedding
    model (``use_embeddings``) and the gated spaces ``xs`` / ``bs`` (token keys embedded)."""
    device = _device(model)
    inputs, values = _feature_inputs(model, batch, device)
    logits = model.forward(**inputs)["logit"].detach()
    targets = _targets(target_class_idx, logits if logits.dim() > 1 else logits[:, None])
    token = {k: bool(model.dataset.input_processors[k].is_token()) for k in values}
    if baseline is None:
        baseline = {k: torch.ones_like(v) if token[k] else torch.zeros_like(v) + 0.01 for k, v in values.items()}
    embed = model.get_embedding_model() if use_embeddings else None
    xs = {k: embed({k: v})[k] if embed is not None and token[k] else v for k, v in values.items()}
    bs = {k: embed({k: baseline[k].to(device)})[k] if embed is not None and token[k] else baseline[k].to(device)
          for k in values}
    return SimpleNamespace(device=device, inputs=inputs, values=values, targets=targets, token=token,
                           baseline=baseline, embed=embed, xs=xs, bs=bs)


def _in_input_shapes(model: Any, batch: dict, results: dict) -> dict[str, torch.Tensor]:
    """The attention methods' shape rule: a result with fewer dims than its raw value (a nested feature's
    per-visit relevance) is unsqueezed and expanded to the value's shape; others are kept as given."""
    out = {}
    for key, vector in results.items():
        feature = batch.get(key)
        value = feature[_schema(model, key).index("value")] if isinstance(feature, (tuple, list)) else feature
        if isinstance(value, torch.Tensor) and value.dim() > vector.dim():
            while vector.dim() < value.dim():
                vector = vector.unsqueeze(-1)
            vector = vector.expand_as(value)
        out[key] = vector
    return out
