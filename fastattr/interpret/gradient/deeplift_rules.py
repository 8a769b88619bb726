"""DeepLIFT's Rescale rule as PyHealth 2.1.0 applies it: activation modules swapped for the call.

PyHealth's ``DeepLift`` replaces every ``nn.ReLU``, ``nn.Sigmoid`` and ``nn.Tanh`` module of the model
(subclasses included) by a wrapper that calls ``torch.relu`` / ``torch.sigmoid`` / ``torch.tanh``. In a
first (reference) forward each wrapper records its input and output, call by call; in the second
(actual) forward the ``i``-th call of each kind is paired with the ``i``-th recorded one and a gradient
hook on its output multiplies the incoming gradient by ``secant / derivative``, so that the backward
through the activation carries the Rescale multiplier ``(y - y0) / (x - x0)`` instead of ``f'(x)``.

The quirks that define PyHealth's numbers are kept, since the numbers must be PyHealth's:
- the secant falls back to the analytic derivative where ``|x - x0| <= eps`` (1e-7), the scale to 1
  where ``|f'(x)| <= eps`` or where it is not finite;
- the scale multiplies autograd's own derivative, so a ReLU whose input is <= 0 passes no gradient
  whatever its reference did (its multiplier is 0, not the secant).
Every other operation keeps its gradient (the paper's linear rule). :class:`RescaleSwap` is the whole
mechanism; it puts the model's modules back on exit, even on error.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

EPS = 1e-7
RULES: tuple[tuple[type[nn.Module], str], ...] = ((nn.ReLU, "relu"), (nn.Sigmoid, "sigmoid"), (nn.Tanh, "tanh"))


def _rule(module: nn.Module) -> str | None:
    return next((name for cls, name in RULES if isinstance(module, cls)), None)


def _slots(module: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Module]]:
    """``(parent, attribute name, child)`` for every submodule, parents before children."""
    for name, child in module.named_children():
        yield module, name, child
        yield from _slots(child)


def derivative(name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The analytic derivative of activation ``name`` at input ``x`` with output ``y``."""
    if name == "relu":
        return (x > 0).to(y.dtype)
    if name == "sigmoid":
        return y * (1.0 - y)
    return 1.0 - y.pow(2)


def _divide(numerator: torch.Tensor, denominator: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator`` where ``|denominator| > EPS``, else ``fallback``."""
    usable = denominator.abs() > EPS
    return torch.where(usable, numerator / torch.where(usable, denominator, torch.ones_like(denominator)), fallback)


def rescale(name: str, x: torch.Tensor, y: torch.Tensor, x0: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
    """The factor PyHealth's hook multiplies an activation's output gradient by: the secant slope
    ``(y - y0) / (x - x0)`` over the analytic derivative (with PyHealth's fallbacks), detached."""
    with torch.no_grad():
        slope = derivative(name, x, y)
        secant = _divide(y - y0.to(y.device), x - x0.to(x.device), slope)
        scale = _divide(secant, slope, torch.ones_like(secant))
        return torch.where(torch.isfinite(scale), scale, torch.ones_like(scale))


class _Recorder:
    """The reference pass's ``(input, output)`` per activation kind, in call order, and the actual
    pass's position in them."""

    def __init__(self) -> None:
        self.mode = "off"
        self.records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for _, n in RULES}
        self.position: dict[str, int] = {n: 0 for _, n in RULES}

    def apply(self, name: str, x: torch.Tensor) -> torch.Tensor:
        y = getattr(torch, name)(x)
        if self.mode == "reference":
            self.records[name].append((x.detach(), y.detach()))
        elif self.mode == "actual":
            i = self.position[name]
            if i >= len(self.records[name]):
                raise RuntimeError(f"DeepLIFT activation mismatch for '{name}': the actual forward called it more "
                                   "often than the reference forward (both must call the activations in the same "
                                   "order)")
            self.position[name] = i + 1
            if y.requires_grad:
                scale = rescale(name, x, y, *self.records[name][i])
                y.register_hook(lambda grad: grad * scale)
        return y


class _Rescaled(nn.Module):
    """Stands in for one activation module during the call."""

    def __init__(self, name: str, recorder: _Recorder) -> None:
        super().__init__()
        self.rule, self.recorder = name, recorder

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.recorder.apply(self.rule, x)


class RescaleSwap:
    """Context manager: the model's ReLU / Sigmoid / Tanh modules swapped for Rescale-rule wrappers.

    Call :meth:`reference` before the reference forward and :meth:`actual` before the actual one.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.recorder = _Recorder()
        self._swapped: list[tuple[nn.Module, str, nn.Module]] = []

    def __enter__(self) -> RescaleSwap:
        found = [(parent, name, child, _rule(child)) for parent, name, child in _slots(self.model)]
        try:
            for parent, name, child, rule in found:
                if rule is not None:
                    setattr(parent, name, _Rescaled(rule, self.recorder))
                    self._swapped.append((parent, name, child))
        except BaseException:
            self._restore()
            raise
        return self

    def reference(self) -> None:
        """The next forward is the reference one: record every activation call."""
        for calls in self.recorder.records.values():
            calls.clear()
        self.recorder.mode = "reference"

    def actual(self) -> None:
        """The next forward is the actual one: rescale each activation's gradient by its recorded pair."""
        if self.recorder.mode != "reference":
            raise RuntimeError("Baseline forward pass must run before actual pass for DeepLIFT.")
        self.recorder.position = dict.fromkeys(self.recorder.position, 0)
        self.recorder.mode = "actual"

    def _restore(self) -> None:
        for parent, name, original in reversed(self._swapped):
            setattr(parent, name, original)
        self._swapped.clear()

    def __exit__(self, *exc: Any) -> None:
        self._restore()
        self.recorder.mode = "off"
        for calls in self.recorder.records.values():
            calls.clear()
