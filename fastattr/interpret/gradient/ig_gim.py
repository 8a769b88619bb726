"""Drop-in replacement for ``pyhealth.interpret.methods.IntegratedGradientGIM`` (PyHealth 2.1.0).

Integrated gradients whose every path point is differentiated under GIM's backward rules
(:mod:`fastattr.interpret.gradient.gim_rules`), on fastattr's IG engine: the path points run as a few large
forwards with input-only backwards, the rules swapped into the model around each forward (they live
in the autograd graph, so the stacked backward applies them), and samples run in length groups where
the padding checks pass for the model under the rules: the logits at the input and the baseline
before every trimmed batch (IG's), and once per model and feature layout the rules' gradients at the
input, padded against trimmed (what the logits cannot show: a backward rule that reaches padding).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from fastattr.interpret.features import FeatureBatch
from fastattr.interpret.gradient.gim import require_embedding_model
from fastattr.interpret.gradient.gim_rules import check_temperature, gim_rules
from fastattr.interpret.gradient.ig import IntegratedGradients
from fastattr.interpret.interpretable import BaselineKeyError, require_interpretable
from fastattr.interpret.lengths import Group, GroupedTask
from fastattr.interpret.padding import PADDING_RTOL, layout_key


class IntegratedGradientGIM(IntegratedGradients):
    """Integrated gradients with GIM's backward rules, PyHealth 2.1.0's ``IntegratedGradientGIM``.

    PyHealth's constructor and ``attribute(baseline=None, steps=None, target_class_idx=None, **batch)``,
    and its numbers: token features interpolated in embedding space (UNK-token baselines by default,
    summed over the embedding dim), continuous ones embedded inside each step (0.01 baselines), the
    ``steps + 1`` points ``k / steps`` with equal weights, the class explained from one forward of the
    model as it is (no rules). The keyword-only options are fastattr's IG's (``method``,
    ``internal_batch_size``, ``return_convergence_delta``, ``backend``, ``pack_lengths``, ``precision``...).

    Args:
        model: a model with PyHealth's ``Interpretable`` methods (``forward_from_embedding``,
            ``get_embedding_model``) and feature protocol; put in eval mode.
        temperature: the softmax temperature of the backward rule, a finite number; values below 1 are
            clamped to 1, as PyHealth does (``self.temperature`` holds the clamped value).
        steps: default number of path subintervals (an integer >= 1), or ``"auto"`` (fastattr's adaptive rule).
        tolerance, backend, pack_lengths, precision: as for :class:`fastattr.IntegratedGradients`.
    """

    def __init__(self, model: torch.nn.Module, temperature: float = 2.0, steps: int | str = 50, *,
                 tolerance: float | None = None, backend: str | None = None, pack_lengths: bool | str = "auto",
                 precision: str = "fp32") -> None:
        require_interpretable(model)
        temperature = check_temperature(temperature)
        super().__init__(model, use_embeddings=True, steps=steps, tolerance=tolerance, backend=backend,
                         pack_lengths=pack_lengths, precision=precision)
        self.temperature = temperature
        # (feature layout, dims trimmed) whose rules' gradients were checked against the padded batch
        self._rules_checked: set[tuple] = set()

    def attribute(self, baseline: dict[str, torch.Tensor] | None = None, steps: int | str | None = None,
                  target_class_idx: int | torch.Tensor | None = None, **batch: Any) -> Any:
        """IG-GIM attributions per feature key (sorted, as PyHealth returns them), each of the raw
        input value's shape; the arguments and keyword-only options of
        :meth:`fastattr.IntegratedGradients.attribute`. As PyHealth: a model whose
        ``get_embedding_model()`` returns ``None`` fails with an ``AssertionError``, a baseline without
        a feature key of the batch with a ``KeyError``."""
        require_embedding_model(self.model)
        if isinstance(baseline, Mapping):
            missing = [k for k in self.model.feature_keys if k in batch and k not in baseline]
            if missing:
                raise BaselineKeyError(f"baseline must give a tensor for every feature key of the batch; "
                                       f"missing {missing}")
        out = super().attribute(baseline, steps, target_class_idx, **batch)
        if isinstance(out, tuple):
            return {k: out[0][k] for k in sorted(out[0])}, out[1]
        return {k: out[k] for k in sorted(out)}

    def _logits(self, call: dict[str, tuple], embedded: bool) -> torch.Tensor:
        """The model's logits for a chunk's call, its forward under the rules (swapped in for the forward
        only; continuous features were embedded before, outside them, as in PyHealth)."""
        with gim_rules(self.model, self.temperature):
            return super()._logits(call, embedded)

    def _task(self, features: FeatureBatch, baselines: dict[str, torch.Tensor], embed: Any, targets: torch.Tensor,
              options: Any, mode: str) -> GroupedTask:
        """IG's task, its check of what this method feeds the model extended by the rules' gradients:
        the one-point rule at the input (one forward and backward), padded against trimmed, once per
        feature layout and set of trimmed dims (a passed check says nothing of a dim it did not trim)."""
        task = super()._task(features, baselines, embed, targets, options, mode)
        one = torch.ones(1, dtype=torch.float64)
        at_input = dataclasses.replace(options, alphas=one, weights=one, return_convergence_delta=False,
                                       progress=False, auto=None)
        gradients = super()._task(features, baselines, embed, targets, at_input, "fp32")
        logits_probe = task.own_probe

        def own_probe(groups: list[Group]) -> float:
            worst = logits_probe(groups) if logits_probe is not None else 0.0
            full = features.padded_sizes()
            key = (layout_key(features, True), tuple(any(s[d] < n for _, s in groups) for d, n in enumerate(full)))
            if worst > PADDING_RTOL or key in self._rules_checked:
                return worst
            whole = gradients.run(None, features)[0]
            trimmed = gradients.place([(g[0], part, gradients.run(g, part)) for g, part in
                                       ((g, features.subset(*g)) for g in groups)])[0]
            worst = max(worst, _attribution_difference(whole, trimmed))
            if worst <= PADDING_RTOL:
                self._rules_checked.add(key)
            return worst
        task.own_probe = own_probe
        return task


def _attribution_difference(whole: dict[str, torch.Tensor], trimmed: dict[str, torch.Tensor]) -> float:
    """Worst relative difference of two runs' attributions (each key against its largest magnitude)."""
    worst = 0.0
    for key, ref in whole.items():
        ref, got = ref.detach().double(), trimmed[key].detach().double()
        if ref.shape != got.shape:
            return float("inf")
        if ref.numel():
            scale = ref.abs().amax().clamp_min(torch.finfo(torch.float32).tiny)
            worst = max(worst, float((ref - got).abs().amax() / scale))
    return worst


__all__ = ["IntegratedGradientGIM"]
