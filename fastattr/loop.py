"""PyHealth's algorithms as they run there: IG with one forward and backward per path point, and
Chefer relevance with a full backward and the full relevance matrix.

This is the baseline fastattr's speed is measured against where PyHealth is not installed, and
the oracle for fastattr's own models in the tests. It follows REFERENCE.md step by step.
"""
from __future__ import annotations

from typing import Any

import torch

from fastattr.interpret.chefer import apply_self_attention_rules, avg_heads
from fastattr.core.integrated import resolve_targets
from fastattr.interpret.features import expand_to_inputs, feature_tuples, model_device, replace_value, value_index, with_masks


def step_loop_integrated_gradients(model: torch.nn.Module, steps: int = 50, baseline: dict | None = None,
                                   target_class_idx: int | None = None, use_embeddings: bool = True,
                                   **batch: Any) -> dict[str, torch.Tensor]:
    """Attributions by PyHealth 2.1.0's algorithm: ``steps + 1`` single-step forward/backward passes."""
    model.eval()
    device = model_device(model)
    features = with_masks(model, {k: tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in f)
                                  for k, f in feature_tuples(model, batch).items()})
    slots = {k: value_index(model, k) for k in features}
    values = {k: features[k][slots[k]] for k in features}
    shapes = {k: v.shape for k, v in values.items()}
    token = {k for k in features if model.dataset.input_processors[k].is_token()}
    with torch.no_grad():
        logits = model.forward(**features)["logit"]
    targets = resolve_targets(target_class_idx, logits, logits.shape[0], logits.shape[1], device)
    if baseline is None:
        bs = {k: torch.ones_like(v) if (use_embeddings and k in token) else torch.zeros_like(v) + 1e-2
              for k, v in values.items()}
    else:
        bs = {k: baseline[k].to(device) for k in values}
    embed = model.get_embedding_model() if use_embeddings else None
    embedded = token if use_embeddings else set()
    if embedded:
        values.update({k: v for k, v in embed({k: values[k] for k in embedded}).items() if k in embedded})
        bs.update({k: v for k, v in embed({k: bs[k] for k in embedded}).items() if k in embedded})
    continuous = set(features) - token if use_embeddings else set()
    sums = {k: torch.zeros_like(values[k], dtype=torch.float32) for k in features}
    for step in range(steps + 1):
        alpha = step / steps
        points = {k: (bs[k] + alpha * (values[k] - bs[k])).detach().requires_grad_(True) for k in features}
        call_values = dict(points)
        if continuous:
            call_values.update({k: v for k, v in embed({k: points[k] for k in continuous}).items() if k in continuous})
        call = {k: replace_value(f, slots[k], call_values[k]) for k, f in features.items()}
        out = (model.forward_from_embedding(**call) if use_embeddings else model.forward(**call))["logit"]
        model.zero_grad()
        out.gather(1, targets.unsqueeze(1)).sum().backward()
        for k in features:
            if points[k].grad is not None:
                sums[k] += points[k].grad
    model.zero_grad(set_to_none=True)
    result = {}
    for k in features:
        attr = (values[k] - bs[k]).detach() * (sums[k] / (steps + 1))
        result[k] = attr.sum(-1) if (k in embedded and attr.dim() >= 3) else attr
    return expand_to_inputs(result, shapes)


def full_relevance(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """PyHealth 2.1.0's propagation as its chefer.py writes it: R = I, then R = R + cam @ R per
    layer with cam = ``avg_heads(attn, grad)``; returns the full ``[B, N, N]``."""
    attn0 = layers[0][0]
    R = torch.eye(attn0.shape[-1], device=attn0.device).unsqueeze(0).repeat(attn0.shape[0], 1, 1)
    for attn, grad in layers:
        R = R + apply_self_attention_rules(R, avg_heads(attn, grad)).detach()
    return R


def full_chefer_relevance(model: torch.nn.Module, target_class_idx: int | None = None, **batch: Any) -> dict[str, torch.Tensor]:
    """Chefer relevance by PyHealth 2.1.0's algorithm: a full backward, then the full R per layer."""
    model.eval()
    model.set_attention_hooks(True)
    try:
        logits = model(**batch)["logit"]
    finally:
        model.set_attention_hooks(False)
    targets = resolve_targets(target_class_idx, logits.detach(), logits.shape[0], logits.shape[1], logits.device)
    model.zero_grad()
    (torch.nn.functional.one_hot(targets, logits.shape[1]).float() * logits).sum().backward()
    model.zero_grad(set_to_none=True)
    R = {key: full_relevance(layers) for key, layers in model.get_attention_layers().items()}
    return model.get_relevance_tensor(R, **batch)
