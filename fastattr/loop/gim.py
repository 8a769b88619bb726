"""PyHealth 2.1.0's GIM and IntegratedGradientGIM, one gradient per path point on the padded batch.

GIM's rules are restated here on their own terms, by detaching instead of custom backward functions,
so that a slip in fastattr's rules cannot hide behind the same slip here:
- attention helpers (class named ``Attention`` with an ``nn.Softmax`` attribute ``softmax``) run as
  :class:`_RuleAttention`: weights ``p`` whose backward is the softmax Jacobian at ``softmax(s / T)``
  (``p.detach() + T q - (T q).detach()`` with ``q = softmax(s / T)``; ``T >= 1``), masked weights
  zeroed after the softmax, and both products halving their gradients (``y/2 + (y/2).detach()``);
- every ``nn.LayerNorm`` normalises with its mean and standard deviation detached.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any

import torch

from fastattr.loop.common import _device, _targets
from fastattr.loop.ig import _ig_inputs, path_loop_integrated_gradients


def _halved(product: torch.Tensor) -> torch.Tensor:
    half = product / 2
    return half + half.detach()


class _RuleAttention(torch.nn.Module):
    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, query, key, value, mask=None, dropout=None):
        scores = _halved(torch.matmul(query, key.transpose(-2, -1))) / math.sqrt(query.size(-1))
        if mask is not None:
            scores = scores.masked_fill(mask == 0, -1e9)
        hot = self.temperature * torch.softmax(scores / self.temperature, dim=-1)
        weights = torch.softmax(scores, dim=-1).detach() + (hot - hot.detach())
        if mask is not None:
            weights = weights.masked_fill(mask == 0, 0)
        if dropout is not None:
            weights = dropout(weights)
        return _halved(torch.matmul(weights, value)), weights


class _RuleLayerNorm(torch.nn.Module):
    def __init__(self, norm: torch.nn.LayerNorm) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x):
        dims = tuple(range(-len(self.norm.normalized_shape), 0))
        mean = x.mean(dim=dims, keepdim=True).detach()
        std = torch.sqrt(x.var(dim=dims, unbiased=False, keepdim=True) + self.norm.eps).detach()
        out = (x - mean) / std
        if self.norm.weight is not None:
            out = out * self.norm.weight
        return out if self.norm.bias is None else out + self.norm.bias


@contextmanager
def _rules(model: torch.nn.Module, temperature: float):
    temperature = max(float(temperature), 1.0)
    swapped = []
    stack = [model]
    while stack:
        parent = stack.pop()
        for name, child in list(parent.named_children()):
            stack.append(child)
            if type(child).__name__ == "Attention" and isinstance(getattr(child, "softmax", None), torch.nn.Softmax):
                swapped.append((parent, name, child))
                setattr(parent, name, _RuleAttention(temperature))
            elif isinstance(child, torch.nn.LayerNorm):
                swapped.append((parent, name, child))
                setattr(parent, name, _RuleLayerNorm(child))
    try:
        yield
    finally:
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)


def loop_gim(model: torch.nn.Module, temperature: float = 2.0, target_class_idx: Any = None,
             **batch: Any) -> dict[str, torch.Tensor]:
    """GIM by PyHealth's algorithm: the gradient of the explained logits (summed over the batch) under
    the rules, at the token embeddings (summed over the embedding dim) and the continuous values."""
    model.eval()
    device = _device(model)
    inputs, values, slots, token = _ig_inputs(model, batch, device)
    with torch.no_grad():
        targets = _targets(target_class_idx, model.forward(**inputs)["logit"])
    embedder = model.get_embedding_model()
    leaves = {}
    for key, value in values.items():
        leaf = embedder({key: value})[key] if token[key] else value.float()
        leaves[key] = leaf.detach().requires_grad_(True)
    call = {}
    for key, feature in inputs.items():
        parts = list(feature)
        parts[slots[key]] = leaves[key] if token[key] else embedder({key: leaves[key]})[key]
        call[key] = tuple(parts)
    with _rules(model, temperature):
        logits = model.forward_from_embedding(**call)["logit"]
    model.zero_grad(set_to_none=True)
    logits.gather(1, targets.view(-1, 1)).sum().backward()
    model.zero_grad(set_to_none=True)
    result = {}
    for key in sorted(leaves):
        grad = leaves[key].grad if leaves[key].grad is not None else torch.zeros_like(leaves[key])
        attr = grad.sum(dim=-1) if token[key] and grad.dim() >= 3 else grad
        shape = values[key].shape
        while attr.dim() < len(shape):
            attr = attr.unsqueeze(-1)
        result[key] = attr.expand(shape) if attr.shape != shape else attr
    return result


def loop_ig_gim(model: torch.nn.Module, temperature: float = 2.0, steps: int = 50, baseline: dict | None = None,
                target_class_idx: Any = None, **batch: Any) -> dict[str, torch.Tensor]:
    """IntegratedGradientGIM by PyHealth's algorithm: the class from the model as it is, then its IG step
    loop (``steps + 1`` points ``k / steps``, equal weights) with every forward and backward under the rules."""
    model.eval()
    inputs, _, _, _ = _ig_inputs(model, batch, _device(model))
    with torch.no_grad():
        targets = _targets(target_class_idx, model.forward(**inputs)["logit"])
    alphas = [step / steps for step in range(steps + 1)]
    with _rules(model, temperature):
        result = path_loop_integrated_gradients(model, alphas, [1.0 / (steps + 1)] * (steps + 1), baseline,
                                                targets, True, **batch)
    return {k: result[k] for k in sorted(result)}
