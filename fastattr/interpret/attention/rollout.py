"""Drop-in replacement for ``pyhealth.interpret.methods.AttentionRollout`` (PyHealth 2.1.0).

Abnar & Zuidema's attention rollout, class-agnostic and gradient-free, as PyHealth computes it: one
forward with the model's attention hooks on, each layer's map averaged over heads and mixed with the
residual, ``A_hat = 0.5 * (A + I)``, the layers composed ``rollout = A_hat_L ... A_hat_1``, reduced by the
model's ``get_relevance_tensor`` and expanded to a nested input's shape.

Differences that only add: the forward runs with gradients enabled even inside ``torch.no_grad()``
(PyHealth's raises there, as the model's hooks register gradient hooks); maps of shape ``[B, N, N]`` are
taken as one head (PyHealth's head mean fails on them); and where forming the whole rollout costs more
than the model (:func:`fastattr.core.relevance.full_path_is_cheaper`) and the model's reduction only
picks one row per sample (:class:`fastattr.interpret.attention.row_picks.RowPicks`, checked once per layout), that
row is pushed from the last layer to the first in O(L N^2), the identical result.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fastattr.core.relevance import full_path_is_cheaper
from fastattr.core.targets import resolve_targets
from fastattr.interpret.attention.row_picks import RowPicks
from fastattr.interpret.base import Interpreter
from fastattr.interpret.features import FeatureBatch
from fastattr.interpret.outputs import logits_of, reported_probabilities
from fastattr.interpret.padding import layout_key

ROLLOUT_METHODS = ("set_attention_hooks", "get_attention_layers", "get_relevance_tensor")
HEAD_FUSIONS = ("mean",)


def residual_maps(layers: Sequence[Any], key: str) -> list[torch.Tensor]:
    """Each layer's ``0.5 * (mean over heads of A + I)``, ``[B, N, N]``, first layer first."""
    if len(layers) == 0:
        raise RuntimeError(f"AttentionRollout expected at least one attention layer for feature '{key}', but found "
                           "none.")
    maps = []
    for layer in layers:
        attn = layer[0] if isinstance(layer, (tuple, list)) else layer
        if attn is None:
            raise RuntimeError(f"AttentionRollout expected attention maps to be captured for feature '{key}', but "
                               "found None.")
        attn = attn.detach()
        fused = attn.mean(dim=1) if attn.dim() == 4 else attn
        if fused.dim() != 3 or fused.shape[-1] != fused.shape[-2]:
            raise ValueError(f"attention maps of feature {key!r} must be [B, H, N, N] or [B, N, N]; got "
                             f"{tuple(attn.shape)}")
        eye = torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device).unsqueeze(0)
        maps.append(0.5 * (fused + eye))
    return maps


def full_rollout(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """``A_hat_L ... A_hat_1`` per sample, ``[B, N, N]``, composed as PyHealth composes it."""
    batch, tokens, _ = maps[0].shape
    rollout = torch.eye(tokens, dtype=maps[0].dtype, device=maps[0].device).unsqueeze(0).expand(batch, tokens, tokens)
    for attn in maps:
        rollout = torch.bmm(attn, rollout)
    return rollout


def rollout_rows(maps: Sequence[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """Row ``rows[b]`` of each sample's rollout, ``[B, N]``: ``e_r^T A_hat_L ... A_hat_1``, last layer first."""
    v = torch.nn.functional.one_hot(rows.to(maps[0].device).long(), maps[0].shape[-1]).to(maps[0].dtype)
    for attn in reversed(maps):
        v = torch.bmm(v.unsqueeze(1), attn).squeeze(1)
    return v


class AttentionRollout(Interpreter):
    """Attention rollout, PyHealth 2.1.0's ``AttentionRollout`` (its arguments and defaults).

    Args:
        model: a model with ``set_attention_hooks``, ``get_attention_layers`` and ``get_relevance_tensor``
            (PyHealth's Transformer and StageAttentionNet); refused with ``TypeError`` otherwise, as
            PyHealth refuses it. It is put in eval mode.
        head_fusion: how heads are combined; only ``"mean"`` (PyHealth's only choice).
    """

    def __init__(self, model: torch.nn.Module, head_fusion: str = "mean") -> None:
        if not isinstance(head_fusion, str) or head_fusion not in HEAD_FUSIONS:
            raise ValueError(f"Unsupported head_fusion={head_fusion!r}; head_fusion must be one of "
                             f"{', '.join(HEAD_FUSIONS)}")
        missing = [m for m in ROLLOUT_METHODS if not hasattr(model, m)]
        if missing:
            raise TypeError(f"AttentionRollout requires a model that exposes the attention interpretability methods: "
                            f"{', '.join(ROLLOUT_METHODS)}. Missing: {', '.join(missing)}.")
        super().__init__(model, ("forward", *ROLLOUT_METHODS), group_method="chefer", compared="logits and relevance")
        self.head_fusion = head_fusion
        self._row_picks = RowPicks()

    def attribute(self, target_class_idx: int | None = None, **data: Any) -> dict[str, torch.Tensor]:
        """Rollout relevance per feature key, ``[batch, tokens]`` as the model's ``get_relevance_tensor``
        gives it (expanded to a nested input's shape); each sample's scores sum to 1 before expansion.

        Args:
            target_class_idx: accepted for PyHealth's signature; rollout is class-agnostic (it only
                sets which class ``last_predictions`` records).
            **data: a dataloader batch, passed to the model as it is.
        """
        model = self.model
        self.begin(data, None, None, None)
        features = FeatureBatch.from_batch(model, data)
        model.set_attention_hooks(True)
        try:
            with torch.enable_grad():
                out = model(**data)
        finally:
            model.set_attention_hooks(False)
        self._record(out, target_class_idx)
        del out
        layers = model.get_attention_layers()
        maps = {key: residual_maps(pairs, key) for key, pairs in layers.items()}
        return features.expand(self._reduce(maps, features, data), nested_only=True)

    def _reduce(self, maps: dict[str, list[torch.Tensor]], features: FeatureBatch,
                data: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``get_relevance_tensor`` of the whole rollouts, or the picked rows computed directly where that
        is cheaper and the reduction is a row pick."""
        with torch.no_grad():
            tokens = {k: m[0].shape[-1] for k, m in maps.items()}
            batch = next(iter(maps.values()))[0].shape[0] if maps else 0
            device = next(iter(maps.values()))[0].device if maps else torch.device("cpu")
            if maps and not all(full_path_is_cheaper(batch, n, len(maps[k]), device) for k, n in tokens.items()):
                picks = self._row_picks.find(self.model, layout_key(features), tokens, batch, data, device)
                if picks is not None:
                    return {k: rollout_rows(maps[k], rows).gather(1, cols.to(device)) for k, (rows, cols) in
                            picks.items()}
            return self.model.get_relevance_tensor({k: full_rollout(m) for k, m in maps.items()}, **data)

    def _record(self, out: Any, target: Any) -> None:
        """``last_predictions`` from the forward's output, where it holds logits."""
        if not isinstance(out, Mapping) or "logit" not in out:
            return
        logits = logits_of(out).detach()
        prob, given = reported_probabilities(out, logits)
        try:
            targets = resolve_targets(target, logits, logits.shape[0], logits.shape[1], logits.device)
        except (TypeError, ValueError):  # rollout ignores the class, as PyHealth's does: never an error here
            targets = resolve_targets(None, logits, logits.shape[0], logits.shape[1], logits.device)
        self.last_predictions, self.last_logits = (prob, targets), logits.float()
        self.last_predictions_as_given = given
