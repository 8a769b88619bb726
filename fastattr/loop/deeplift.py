"""PyHealth 2.1.0's DeepLift, step by step: a no-grad forward for the class, a reference forward and an
actual forward with the Rescale rule on ReLU / Sigmoid / Tanh modules, a full backward.

The Rescale rule is applied here with forward hooks on the activation modules (PyHealth swaps the
modules; the numbers are the same for modules that do not work in place): the reference forward records
each call's input and output per kind, in call order; the actual forward pairs the ``i``-th call of a
kind with the ``i``-th recorded one and scales the gradient at its output by ``secant / f'(x)``, with
PyHealth's fallbacks (``|dx| <= 1e-7``: the derivative; ``|f'(x)| <= 1e-7`` or not finite: 1).
"""
from __future__ import annotations

from typing import Any

import torch

from fastattr.loop.common import _device, _feature_inputs, _schema, _targets

_KINDS = ((torch.nn.ReLU, "relu"), (torch.nn.Sigmoid, "sigmoid"), (torch.nn.Tanh, "tanh"))


def _slope(kind: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if kind == "relu":
        return torch.where(x > 0, torch.ones_like(y), torch.zeros_like(y))
    return y * (1 - y) if kind == "sigmoid" else 1 - y * y


def _scale(kind: str, x: torch.Tensor, y: torch.Tensor, x0: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
    slope = _slope(kind, x, y)
    dx, dy = x - x0, y - y0
    secant = torch.where(dx.abs() > 1e-7, dy / torch.where(dx.abs() > 1e-7, dx, torch.ones_like(dx)), slope)
    scale = torch.where(slope.abs() > 1e-7, secant / torch.where(slope.abs() > 1e-7, slope, torch.ones_like(slope)),
                        torch.ones_like(secant))
    return torch.where(torch.isfinite(scale), scale, torch.ones_like(scale)).detach()


class _RescaleHooks:
    """Forward hooks on every activation module: ``mode`` "reference" records, "actual" rescales."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.mode, self.seen = "reference", {k: [] for _, k in _KINDS}
        self.count = {k: 0 for _, k in _KINDS}
        self.handles = []
        for module in model.modules():
            kind = next((k for cls, k in _KINDS if isinstance(module, cls)), None)
            if kind is not None:
                self.handles.append(module.register_forward_hook(self._hook(kind)))

    def _hook(self, kind: str):
        def hook(module, args, output):
            x = args[0]
            if self.mode == "reference":
                self.seen[kind].append((x.detach(), output.detach()))
                return None
            x0, y0 = self.seen[kind][self.count[kind]]
            self.count[kind] += 1
            if output.requires_grad:
                scale = _scale(kind, x.detach(), output.detach(), x0, y0)
                output.register_hook(lambda g: g * scale)
            return None
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def loop_deeplift(model: torch.nn.Module, baseline: dict | None = None, target_class_idx: Any = None,
                  use_embeddings: bool = True, **batch: Any) -> dict[str, torch.Tensor]:
    """DeepLIFT attributions by PyHealth 2.1.0's algorithm, keys sorted, in the raw values' shapes."""
    model.eval()
    device = _device(model)
    inputs, values = _feature_inputs(model, batch, device)
    with torch.no_grad():
        targets = _targets(target_class_idx, model.forward(**inputs)["logit"])
    tokens = {k for k in values if use_embeddings and model.dataset.input_processors[k].is_token()}
    if baseline is None:
        baseline = {k: torch.ones_like(v) if k in tokens else torch.zeros_like(v) + 0.01 for k, v in values.items()}
    bs = {k: baseline[k].to(device) for k in values}
    xs = dict(values)
    embed = model.get_embedding_model() if use_embeddings else None
    if tokens:
        xs.update(embed({k: values[k] for k in tokens}))
        bs.update(embed({k: bs[k] for k in tokens}))

    def run(vals: dict[str, torch.Tensor]) -> torch.Tensor:
        vals = dict(vals)
        rest = [k for k in vals if k not in tokens]
        if use_embeddings and rest:
            vals.update(embed({k: vals[k] for k in rest}))
        call = {}
        for key, parts in inputs.items():
            slot = _schema(model, key).index("value")
            call[key] = (*parts[:slot], vals[key], *parts[slot + 1:])
        out = model.forward_from_embedding(**call) if use_embeddings else model.forward(**call)
        return out["logit"].gather(1, targets.unsqueeze(1)).squeeze(1)

    keys = sorted(xs)
    deltas = {k: (xs[k] - bs[k]).detach().requires_grad_(True) for k in keys}
    hooks = _RescaleHooks(model)
    try:
        with torch.no_grad():
            reference = run({k: bs[k].detach() for k in keys})
        hooks.mode = "actual"
        actual = run({k: bs[k].detach() + deltas[k] for k in keys})
    finally:
        hooks.remove()
    model.zero_grad(set_to_none=True)
    actual.sum().backward()
    model.zero_grad(set_to_none=True)
    attributions = {}
    for k in keys:
        a = deltas[k].grad * deltas[k].detach()
        attributions[k] = a.sum(-1) if k in tokens and a.dim() >= 3 else a
    total = sum(a.reshape(a.shape[0], -1).sum(1) for a in attributions.values())
    difference = actual.detach() - reference
    scale = torch.where(total.abs() > 1e-8, difference / torch.where(total.abs() > 1e-8, total, 1.0), 1.0)
    out = {}
    for k, a in attributions.items():
        a = a * scale.view(-1, *[1] * (a.dim() - 1))
        while a.dim() < values[k].dim():
            a = a.unsqueeze(-1)
        out[k] = a.expand(values[k].shape) if a.shape != values[k].shape else a
    return out
