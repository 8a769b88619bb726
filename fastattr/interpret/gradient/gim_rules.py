"""GIM's backward rules (Edin et al., 2025), as PyHealth 2.1.0 applies them, for ``GIM`` and
``IntegratedGradientGIM``.

Inside :func:`gim_rules` a model's modules are swapped for the call and put back afterwards:
- an attention helper of PyHealth's kind (a module whose class is named ``Attention`` with an
  ``nn.Softmax`` attribute ``softmax``, called as ``(query, key, value, mask=None, dropout=None)``) runs
  as :class:`GIMAttention`: the softmax's backward takes its Jacobian at ``softmax(scores / T)`` (no
  ``1/T`` factor), and both products (``Q K^T`` and ``attn V``) halve their gradients (so ``Q`` and ``K``
  get a quarter, ``V`` a half);
- every ``nn.LayerNorm`` runs as :class:`FrozenLayerNorm`: the same output, with the mean and the
  variance taken as constants in the backward.
Only the backward changes, except where PyHealth's replacement attention differs in its forward too:
it zeroes the weights of masked positions after the softmax (a fully masked row attends nowhere instead
of uniformly). The rules live in the autograd graph, so a backward taken after the context has closed
(a batched path's input-only backward) still applies them.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def effective_temperature(temperature: float) -> float:
    """The temperature the rules use: PyHealth clamps it to at least 1."""
    return max(float(temperature), 1.0)


def check_temperature(temperature: Any) -> float:
    """``temperature`` as the rules use it (clamped to at least 1, as PyHealth does); ``ValueError``
    naming it unless it is a finite real number."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not math.isfinite(temperature):
        raise ValueError("temperature must be a finite real number (the softmax temperature of GIM's backward "
                         f"rule; values below 1 are clamped to 1); got {temperature!r}")
    return effective_temperature(temperature)


class TemperatureSoftmax(torch.autograd.Function):
    """``softmax(x)`` forward; backward ``p_T * (g - <p_T, g>)`` with ``p_T = softmax(x / T)``."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, dim: int, temperature: float) -> torch.Tensor:
        probs = torch.softmax(scores, dim=dim)
        # the Jacobian's point is all the backward needs: keep it instead of the scores
        ctx.save_for_backward(probs if temperature == 1.0 else torch.softmax(scores / temperature, dim=dim))
        ctx.dim = dim
        return probs

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (point,) = ctx.saved_tensors
        # softmax's own fused backward, p * (g - <p, g>), taken at the point p_T
        return torch._softmax_backward_data(grad, point, ctx.dim, point.dtype), None, None


class HalvedMatmul(torch.autograd.Function):
    """``a @ b`` whose backward gives each factor half its gradient (GIM's uniform division, fan-in 2)."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return a @ b

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        a, b = ctx.saved_tensors
        half = grad * 0.5  # exact: a power of two
        # under autocast the forward multiplied in the output's dtype: so does the backward
        grad_a = half @ b.transpose(-2, -1).to(half.dtype) if ctx.needs_input_grad[0] else None
        grad_b = a.transpose(-2, -1).to(half.dtype) @ half if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


class FrozenNormalize(torch.autograd.Function):
    """``(x - mean) / std`` over the last ``len(shape)`` dims (LayerNorm without its affine map); in the
    backward the statistics are constants: ``dx = g / std``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, shape: tuple[int, ...], eps: float) -> torch.Tensor:
        normed, _, rstd = torch.native_layer_norm(x, shape, None, None, eps)
        ctx.save_for_backward(rstd)
        return normed

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (rstd,) = ctx.saved_tensors
        return grad * rstd, None, None


class FrozenLayerNorm(torch.nn.Module):
    """An ``nn.LayerNorm`` (held, not copied) whose backward treats its statistics as constants; its
    affine map is ordinary autograd (a backward that needs only input gradients skips the parameters')."""

    def __init__(self, original: torch.nn.LayerNorm) -> None:
        super().__init__()
        self.original = original

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.original
        out = FrozenNormalize.apply(x, tuple(norm.normalized_shape), norm.eps)
        if norm.weight is not None:
            out = out * norm.weight if norm.bias is None else torch.addcmul(norm.bias, out, norm.weight)
        elif norm.bias is not None:
            out = out + norm.bias
        return out


class GIMAttention(torch.nn.Module):
    """Scaled dot-product attention with GIM's rules, called as PyHealth's ``Attention`` helper:
    ``(query, key, value, mask=None, dropout=None) -> (output, attention weights)``."""

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = effective_temperature(temperature)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: torch.Tensor | None = None,
                dropout: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        scores = HalvedMatmul.apply(query, key.transpose(-2, -1)) / math.sqrt(query.size(-1))
        masked = None if mask is None else mask == 0
        if masked is not None:
            scores = scores.masked_fill(masked, -1e9)
        weights = TemperatureSoftmax.apply(scores, -1, self.temperature)
        if masked is not None:
            weights = weights.masked_fill(masked, 0)
        if dropout is not None:
            weights = dropout(weights)
        return HalvedMatmul.apply(weights, value), weights


def is_gim_attention_target(module: torch.nn.Module) -> bool:
    """Whether ``module`` is an attention helper the rules replace (PyHealth's test: the class is named
    ``Attention`` and has an ``nn.Softmax`` attribute ``softmax``)."""
    return type(module).__name__ == "Attention" and isinstance(getattr(module, "softmax", None), torch.nn.Softmax)


def _swaps(module: torch.nn.Module, temperature: float) -> Iterator[tuple[torch.nn.Module, str, torch.nn.Module,
                                                                            torch.nn.Module]]:
    """``(parent, name, original, replacement)`` for every module the rules replace, depth first."""
    for name, child in list(module.named_children()):
        if is_gim_attention_target(child):
            yield module, name, child, GIMAttention(temperature)
        elif isinstance(child, torch.nn.LayerNorm):
            yield module, name, child, FrozenLayerNorm(child)
        yield from _swaps(child, temperature)


@contextmanager
def gim_rules(model: torch.nn.Module, temperature: float) -> Iterator[torch.nn.Module]:
    """Run ``model`` under GIM's backward rules for the duration of the block (``temperature`` is
    clamped to at least 1); every swapped module is put back on exit, also on error."""
    done: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
    try:
        for parent, name, original, replacement in _swaps(model, effective_temperature(temperature)):
            setattr(parent, name, replacement)
            done.append((parent, name, original))
        yield model
    finally:
        for parent, name, original in reversed(done):
            setattr(parent, name, original)


__all__ = [
    "FrozenLayerNorm",
    "FrozenNormalize",
    "GIMAttention",
    "HalvedMatmul",
    "TemperatureSoftmax",
    "check_temperature",
    "effective_temperature",
    "gim_rules",
    "is_gim_attention_target",
]
