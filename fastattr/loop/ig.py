"""PyHealth 2.1.0's Integrated Gradients, one forward and backward per path point on the padded batch."""
from __future__ import annotations

from typing import Any

import torch

from fastattr.loop.common import _device, _schema, _targets


def _ig_inputs(model: Any, batch: dict, device: torch.device) -> tuple[dict, dict, dict, dict]:
    """Step 1-2 of PyHealth's IG: the feature tuples (a mask appended where the schema has none),
    their values, value slots and token-ness."""
    inputs, values, slots, token = {}, {}, {}, {}
    for key in model.feature_keys:
        if key not in batch:
            continue
        feature = batch[key]
        feature = tuple(feature) if isinstance(feature, (tuple, list)) else (feature,)
        feature = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in feature)
        schema = _schema(model, key)
        slot = schema.index("value")
        value = feature[slot]
        is_token = bool(model.dataset.input_processors[key].is_token())
        if "mask" not in schema:  # step 2: the appended mask
            if is_token:
                mask = (value != 0).int()
            elif value.dim() >= 3:
                mask = (value.abs().sum(dim=-1) != 0).int()
            else:
                mask = (value != 0).int()
            feature = feature + (mask,)
        inputs[key], values[key], slots[key], token[key] = feature, value, slot, is_token
    return inputs, values, slots, token


def step_loop_integrated_gradients(model: torch.nn.Module, steps: int = 50, baseline: dict | None = None,
                                   target_class_idx: Any = None, use_embeddings: bool = True,
                                   **batch: Any) -> dict[str, torch.Tensor]:
    """Attributions by PyHealth 2.1.0's algorithm: ``steps + 1`` single-point forward/backward passes."""
    alphas = [step / steps for step in range(steps + 1)]
    return path_loop_integrated_gradients(model, alphas, [1.0 / (steps + 1)] * (steps + 1), baseline,
                                          target_class_idx, use_embeddings, **batch)


def path_loop_integrated_gradients(model: torch.nn.Module, alphas: list[float], weights: list[float],
                                   baseline: dict | None = None, target_class_idx: Any = None,
                                   use_embeddings: bool = True, **batch: Any) -> dict[str, torch.Tensor]:
    """PyHealth's algorithm with any quadrature: one forward/backward per path point ``alphas[j]``,
    the gradients summed with ``weights[j]`` (PyHealth's own: ``k / steps``, ``1 / (steps + 1)``);
    with a converged rule, the reference integral for ``steps="auto"``."""
    model.eval()
    device = _device(model)
    inputs, values, slots, token = _ig_inputs(model, batch, device)
    raw_shapes = {k: v.shape for k, v in values.items()}

    with torch.no_grad():
        logits = model.forward(**inputs)["logit"]
    targets = _targets(target_class_idx, logits)

    # step 4: baselines in raw space
    if baseline is None:
        base = {k: torch.ones_like(v) if (use_embeddings and token[k]) else torch.zeros_like(v) + 0.01
                for k, v in values.items()}
    else:
        base = {k: baseline[k].to(device) for k in values}
    # step 5: token features' values and baselines replaced by their embeddings
    embedder = model.get_embedding_model() if use_embeddings else None
    embedded = {k for k in values if use_embeddings and token[k]}
    x = dict(values)
    if embedded:
        with torch.no_grad():
            ex = embedder({k: values[k] for k in embedded})
            eb = embedder({k: base[k] for k in embedded})
        for k in embedded:
            x[k], base[k] = ex[k], eb[k]
    x = {k: v.float() if not v.is_floating_point() else v for k, v in x.items()}
    base = {k: b.to(x[k].dtype) for k, b in base.items()}
    grads = _path_gradients(model, inputs, slots, token, x, base, targets, alphas, weights, embedder)

    # steps 7-8: the weighted sum, times (x - b), summed over the embedding dim, mapped to the raw shape
    result = {}
    for k in x:
        attr = (x[k] - base[k]) * grads[k]
        if k in embedded and attr.dim() >= 3:
            attr = attr.sum(dim=-1)
        shape = raw_shapes[k]
        if attr.shape != shape:
            while attr.dim() < len(shape):
                attr = attr.unsqueeze(-1)
            attr = attr.expand(shape)
        result[k] = attr.detach()
    return result


def _path_gradients(model: Any, inputs: dict, slots: dict, token: dict, x: dict, base: dict, targets: torch.Tensor,
                    alphas: list[float], weights: list[float], embedder: Any) -> dict[str, torch.Tensor]:
    """Step 6: one forward and backward per path point, the gradients summed with the weights."""
    grads = {k: torch.zeros_like(x[k]) for k in x}
    for alpha, weight in zip(alphas, weights, strict=True):
        points = {k: (base[k] + alpha * (x[k] - base[k])).detach().requires_grad_(True) for k in x}
        call = {}
        for k, feature in inputs.items():
            point = points[k]
            if embedder is not None and not token[k]:
                point = embedder({k: point})[k]
            parts = list(feature)
            parts[slots[k]] = point
            call[k] = tuple(parts)
        out = (model.forward_from_embedding(**call) if embedder is not None else model.forward(**call))["logit"]
        model.zero_grad()
        out.gather(1, targets.view(-1, 1)).sum().backward()
        for k in x:
            if points[k].grad is not None:
                grads[k] += weight * points[k].grad
    model.zero_grad(set_to_none=True)
    return grads
