"""Drop-in replacement for ``pyhealth.interpret.methods.GIM`` (PyHealth 2.1.0): one gradient of the
explained logit under GIM's backward rules (:mod:`fastattr.interpret.gradient.gim_rules`).

As PyHealth: the class explained comes from one no-grad forward of the model as it is; the gradient is
taken at the token features' embeddings (summed over the embedding dim) and at the continuous features'
raw values (embedded outside the rules), and is the attribution itself (no ``x - baseline`` factor).
Unlike PyHealth only the inputs' gradients are taken (no parameter's ``.grad`` is written).
"""
from __future__ import annotations

from typing import Any

import torch

from fastattr.core.targets import resolve_targets
from fastattr.interpret.base import Interpreter
from fastattr.interpret.features import FeatureBatch
from fastattr.interpret.gradient.gim_rules import check_temperature, gim_rules
from fastattr.interpret.interpretable import require_interpretable
from fastattr.interpret.outputs import logits_of


class MissingEmbeddingModel(AssertionError, TypeError):
    """``model.get_embedding_model()`` returned ``None`` (an ``AssertionError`` as PyHealth's, and a
    ``TypeError`` as fastattr's IntegratedGradients raises)."""


def require_embedding_model(model: Any) -> torch.nn.Module:
    """``model.get_embedding_model()``, or :class:`MissingEmbeddingModel` when it is ``None``."""
    embed = model.get_embedding_model()
    if embed is None:
        raise MissingEmbeddingModel(f"{type(model).__name__}.get_embedding_model() returned None; GIM's methods "
                                    "need the embedding module")
    return embed


class GIM(Interpreter):
    """Gradient Interaction Modifications, PyHealth 2.1.0's ``GIM``.

    Args:
        model: a model with PyHealth's ``Interpretable`` methods (``forward_from_embedding``,
            ``get_embedding_model``) and feature protocol; put in eval mode.
        temperature: the softmax temperature of the backward rule, a finite number; values below 1 are
            clamped to 1, as PyHealth does (``self.temperature`` holds the clamped value).
    """

    def __init__(self, model: torch.nn.Module, temperature: float = 2.0) -> None:
        require_interpretable(model)
        temperature = check_temperature(temperature)
        super().__init__(model, ("forward",), group_method="integrated_gradients", compared="logits")
        self.temperature = temperature

    def attribute(self, target_class_idx: int | torch.Tensor | None = None, **batch: Any) -> dict[str, torch.Tensor]:
        """GIM attributions per feature key (sorted, as PyHealth returns them), each of the raw input
        value's shape.

        Args:
            target_class_idx: class to explain, an int or one class per sample; ``None`` takes the argmax
                of the model's logits. Ignored for a single logit.
            **batch: a dataloader batch; entries that are not feature keys are ignored.
        """
        model = self.model
        device, _ = self.begin(batch, None, None, None)
        features = FeatureBatch.from_batch(model, batch, device=device)
        _, targets = self.forward_as_given(
            features, lambda out: resolve_targets(target_class_idx, out, features.size, out.shape[1], device))
        self.last_groups = [(features.size, None)]

        embed = require_embedding_model(model)
        tokens = features.token_keys()
        leaves = self._leaves(features, embed, tokens)
        with torch.enable_grad():
            values = dict(leaves)
            continuous = [k for k in leaves if k not in tokens]
            if continuous:
                values.update({k: v for k, v in embed({k: leaves[k] for k in continuous}).items() if k in continuous})
            with gim_rules(model, self.temperature):
                picked = logits_of(model.forward_from_embedding(**features.call(values))).gather(1, targets[:, None])
            keys = sorted(leaves)
            grads = torch.autograd.grad(picked.sum(), [leaves[k] for k in keys], allow_unused=True)
        result = {}
        for key, grad in zip(keys, grads, strict=True):
            grad = torch.zeros_like(leaves[key]) if grad is None else grad.detach()
            result[key] = grad.sum(dim=-1) if key in tokens and grad.dim() >= 3 else grad
        return features.expand(result)

    @staticmethod
    def _leaves(features: FeatureBatch, embed: torch.nn.Module, tokens: set[str]) -> dict[str, torch.Tensor]:
        """What the gradient is taken at: token features' embeddings, continuous features' values."""
        values = features.values()
        with torch.no_grad():
            embedded = embed({k: values[k] for k in tokens}) if tokens else {}
        leaves = {}
        for key, value in values.items():
            leaf = embedded[key] if key in tokens else value if value.is_floating_point() else value.float()
            leaves[key] = leaf.detach().clone().requires_grad_(True)
        return leaves


__all__ = ["GIM", "MissingEmbeddingModel", "require_embedding_model"]
