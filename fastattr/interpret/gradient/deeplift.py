"""Drop-in replacement for ``pyhealth.interpret.methods.DeepLift`` (PyHealth 2.1.0).

PyHealth's algorithm, step for step: PyHealth's masks appended where the schema has none, its default
baselines (token id 1, embedded, for token features; 0.01 for the rest), token features and their
baselines embedded, continuous ones embedded inside each forward; a reference forward (no grad) at the
baseline and an actual forward at ``baseline + (input - baseline)`` with ReLU / Sigmoid / Tanh modules
under PyHealth's Rescale rule (:mod:`fastattr.interpret.gradient.deeplift_rules`); ``grad * delta`` summed over a
token feature's embedding dim; each sample's attributions scaled so they sum to ``f(x) - f(x0)`` of its
target logit; results in the raw values' shapes, keys sorted.

What it does not redo: PyHealth's extra no-grad forward of the batch, run only to take the argmax class,
is skipped where the class is already known (one logit, ``target_class_idx`` given) or the actual
forward's logits leave no near-tie to settle (:data:`TIE_RTOL`); and its backward goes to the deltas
only, not to every weight. The batch runs padded, as in PyHealth: trimming it to length groups would
need a padding check of its own per batch (the baseline fills padded positions, so IG's own-probe
applies), which costs as much as the two forwards it could shorten.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fastattr.core.integrated import broadcasts_to
from fastattr.core.targets import resolve_targets
from fastattr.interpret.base import Interpreter
from fastattr.interpret.features import FeatureBatch
from fastattr.interpret.gradient.deeplift_rules import RescaleSwap
from fastattr.interpret.interpretable import BaselineKeyError, is_interpretable
from fastattr.interpret.outputs import logits_of, reported_probabilities

# A sample whose two largest logits are this close (relative to its largest |logit|, at least 1) has its
# class taken from a no-grad forward of the batch as given, as PyHealth takes it: the actual forward's
# logits (from ``b + (x - b)``, through ``forward_from_embedding``) differ from it by float rounding.
TIE_RTOL = 1e-3


class DeepLiftInputError(ValueError, RuntimeError):
    """Input PyHealth's DeepLift fails on with a ``RuntimeError`` deep inside (a baseline that does not
    broadcast, float token ids, a class out of range): the same type, and a ``ValueError``, said clearly."""


class BaselineTypeError(TypeError, AttributeError):
    """A baseline that is not a mapping (PyHealth fails on it with an ``AttributeError``)."""


class DeepLift(Interpreter):
    """DeepLIFT (Rescale rule) attributions, PyHealth 2.1.0's ``DeepLift`` (its arguments and defaults).

    Args:
        model: a model following the PyHealth protocol with ``forward_from_embedding`` and
            ``get_embedding_model`` (PyHealth's ``Interpretable``; refused with ``ValueError`` otherwise,
            as PyHealth refuses it). It is put in eval mode.
        use_embeddings: attribute token features in embedding space (``forward_from_embedding``); with
            ``False`` the raw values go through ``forward`` (continuous features only, as in PyHealth).
    """

    def __init__(self, model: torch.nn.Module, use_embeddings: bool = True) -> None:
        if not is_interpretable(model):
            raise ValueError("Model must implement Interpretable interface: DeepLift needs model.forward_from_embedding"
                             f"() and model.get_embedding_model(), which {type(model).__name__} does not define")
        if not isinstance(use_embeddings, (bool, np.bool_)):
            raise TypeError(f"use_embeddings must be True or False; got {use_embeddings!r}")
        super().__init__(model, ("forward",), group_method="integrated_gradients", compared="logits")
        self.use_embeddings = bool(use_embeddings)

    def attribute(self, baseline: Mapping[str, Any] | None = None, target_class_idx: int | None = None,
                  **batch: Any) -> dict[str, torch.Tensor]:
        """DeepLIFT attributions per feature key (sorted), each in its raw input value's shape; each
        sample's attributions sum to ``f(x) - f(baseline)`` of its target logit.

        Args:
            baseline: per feature key, the reference input in raw space (token ids for token
                features); default PyHealth's: token id 1 (with ``use_embeddings``), else 0.01.
            target_class_idx: the class explained (default: the argmax of the logits; a single logit
                is always explained).
            **batch: a dataloader batch; entries that are not feature keys are ignored.
        """
        device, _ = self.begin(batch, None, None, None)
        features = FeatureBatch.from_batch(self.model, batch, device=device)
        tokens = features.token_keys() if self.use_embeddings else set()
        embed = self._embedding_model() if self.use_embeddings else None
        xs, bs = self._endpoints(features, self._baselines(baseline, features, device), tokens, embed)
        return features.expand(self._deeplift(features, xs, bs, tokens, embed, target_class_idx))

    # -- pieces ------------------------------------------------------------------------------
    def _embedding_model(self) -> Any:
        embed = self.model.get_embedding_model()
        if embed is None:
            raise TypeError("DeepLift with use_embeddings=True needs model.get_embedding_model() to return the "
                            "embedding module; it returned None")
        return embed

    def _baselines(self, baseline: Mapping[str, Any] | None, features: FeatureBatch,
                   device: torch.device) -> dict[str, torch.Tensor]:
        """Raw-space baselines: PyHealth's defaults, or the caller's (as given, on the model's device)."""
        values = features.values()
        tokens = features.token_keys() if self.use_embeddings else set()
        if baseline is None:
            return {k: torch.ones_like(v) if k in tokens else torch.zeros_like(v) + 1e-2 for k, v in values.items()}
        if not isinstance(baseline, Mapping):
            raise BaselineTypeError(f"baseline must be a dict from feature key to tensor or None; got "
                                    f"{type(baseline).__name__}")
        missing = [k for k in values if k not in baseline]
        if missing:
            raise BaselineKeyError(f"baseline must give a tensor for every feature key of the batch; missing {missing}")
        out = {}
        for k, v in values.items():
            b = torch.as_tensor(baseline[k]).to(device)
            if not broadcasts_to(b.shape, v.shape):
                raise DeepLiftInputError(f"baseline[{k!r}] of shape {tuple(b.shape)} does not broadcast to the input "
                                         f"shape {tuple(v.shape)}")
            if k in tokens and (b.is_floating_point() or b.is_complex()):
                raise DeepLiftInputError(f"baseline[{k!r}] holds token ids for an embedded feature and must be an "
                                         f"integer tensor; got {b.dtype}")
            out[k] = b.expand_as(v)
        return out

    @staticmethod
    def _endpoints(features: FeatureBatch, baselines: dict[str, torch.Tensor], tokens: set[str],
                   embed: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Inputs and baselines per key, token features (and their baselines) embedded."""
        xs, bs = features.values(), dict(baselines)
        if tokens:
            xs.update(embed({k: xs[k] for k in tokens}))
            bs.update(embed({k: bs[k] for k in tokens}))
        return xs, bs

    def _call(self, features: FeatureBatch, values: dict[str, torch.Tensor], tokens: set[str], embed: Any) -> Any:
        """The model on ``values`` in the value slots: continuous ones embedded and ``forward_from_embedding``
        with ``use_embeddings``, else ``forward``."""
        if embed is None:
            return self.model.forward(**features.call(values))
        continuous = [k for k in values if k not in tokens]
        if continuous:
            values = {**values, **embed({k: values[k] for k in continuous})}
        return self.model.forward_from_embedding(**features.call(values))

    def _deeplift(self, features: FeatureBatch, xs: dict[str, torch.Tensor], bs: dict[str, torch.Tensor],
                  tokens: set[str], embed: Any, target: Any) -> dict[str, torch.Tensor]:
        """The reference and actual forwards under the Rescale rule, the backward to the deltas, and
        PyHealth's completeness scaling."""
        keys = sorted(xs)
        delta = {k: (xs[k] - bs[k]).detach().requires_grad_(True) for k in keys}
        with RescaleSwap(self.model) as swap:
            swap.reference()
            with torch.no_grad():
                reference = logits_of(self._call(features, {k: bs[k].detach() for k in keys}, tokens, embed))
            swap.actual()
            with torch.enable_grad():
                out = self._call(features, {k: bs[k].detach() + delta[k] for k in keys}, tokens, embed)
        logits = logits_of(out)
        targets = self._targets(target, logits, out, features)
        chosen = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
        grads = torch.autograd.grad(chosen.sum(), [delta[k] for k in keys], allow_unused=True)
        attributions = {}
        for key, grad in zip(keys, grads, strict=True):
            attr = torch.zeros_like(delta[key]) if grad is None else grad * delta[key].detach()
            if key in tokens and attr.dim() >= 3:
                attr = attr.sum(dim=-1)
            attributions[key] = attr
        return complete(attributions, chosen.detach() - reference.gather(1, targets.unsqueeze(1)).squeeze(1))

    def _targets(self, target: Any, logits: torch.Tensor, out: Any, features: FeatureBatch) -> torch.Tensor:
        """PyHealth's class per sample; the argmax from a no-grad forward of the batch only where the actual
        forward's logits hold a near-tie. Records ``last_predictions``."""
        size, classes = logits.shape
        prob, given = reported_probabilities(out, logits)
        self.last_predictions_as_given, self.last_logits = False, logits.detach().float()
        if classes == 1 or target is not None:
            try:
                targets = resolve_targets(target, None, size, classes, logits.device)
            except ValueError as exc:
                raise DeepLiftInputError(str(exc)) from None
        else:
            top = logits.detach().topk(2, dim=1).values
            if bool(((top[:, 0] - top[:, 1]) <= TIE_RTOL * logits.detach().abs().amax(1).clamp_min(1.0)).any()):
                with torch.no_grad():
                    out = self.model.forward(**features.call())
                logits = logits_of(out)
                prob, given = reported_probabilities(out, logits)
                self.last_logits = logits.detach().float()
                self.last_predictions_as_given = given and not features.appended
            targets = logits.detach().argmax(dim=-1)
        self.last_predictions = (prob, targets)
        return targets


def complete(attributions: dict[str, torch.Tensor], difference: torch.Tensor, eps: float = 1e-8
             ) -> dict[str, torch.Tensor]:
    """PyHealth's completeness rule: each sample's attributions (over every key) scaled to sum to
    ``difference``, where their sum is larger than ``eps`` in magnitude; left as they are elsewhere."""
    total = sum(a.reshape(a.shape[0], -1).sum(dim=1) for a in attributions.values())
    scale = torch.ones_like(difference)
    usable = total.abs() > eps
    scale[usable] = difference[usable] / total[usable]
    return {k: a * scale.view(-1, *[1] * (a.dim() - 1)) for k, a in attributions.items()}
