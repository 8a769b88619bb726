"""PyHealth 2.1.0's metric classes: ``RemovalBasedMetric``, ``ComprehensivenessMetric`` and
``SufficiencyMetric``, same constructor, ``compute`` signature and results, on the fast engine
(:class:`fastattr.metrics.removal.RemovalScorer`)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fastattr.core.checks import check_choice, check_count, check_pack_lengths, check_percentages
from fastattr.metrics.ablation import STRATEGIES, ablate_rows
from fastattr.metrics.filters import SampleClass, SampleFilterFn, classifier_type, get_model_predictions
from fastattr.metrics.masks import top_masks
from fastattr.metrics.removal import Originals, RemovalScorer, value_of, with_value

PERCENTAGES = [1, 5, 10, 20, 50]


def check_metric_options(percentages: Any, ablation_strategy: Any) -> list[float]:
    """The percentages as a list, after checking both options (one message naming each)."""
    check_choice("ablation_strategy", ablation_strategy, STRATEGIES)
    return check_percentages(percentages)


def check_attributions(model: Any, inputs: Any, attributions: Any) -> None:
    """Before any forward: every attribution key is an input, and each attribution is a float32 or
    float64 tensor that broadcasts to its input value's shape (the masks are taken on it)."""
    if not isinstance(inputs, Mapping) or not isinstance(attributions, Mapping):
        raise TypeError("inputs and attributions must be dicts from feature key to tensor")
    for key, attr in attributions.items():
        if key not in inputs:
            raise ValueError(f"attributions has key {key!r}, which the inputs lack; input keys: {sorted(inputs)}")
        if not isinstance(attr, torch.Tensor) or attr.dtype not in (torch.float32, torch.float64):
            got = attr.dtype if isinstance(attr, torch.Tensor) else type(attr).__name__
            raise TypeError(f"attributions[{key!r}] must be a float32 or float64 tensor; got {got}")
        value = value_of(model, key, inputs[key])
        try:
            fits = torch.broadcast_shapes(attr.shape, value.shape) == value.shape and attr.dim() == value.dim()
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"attributions[{key!r}] has shape {tuple(attr.shape)}, which does not match the input "
                             f"value's shape {tuple(value.shape)} (it must equal it, or broadcast to it)")


class RemovalBasedMetric:
    """Base of the removal-based faithfulness metrics (PyHealth's ``RemovalBasedMetric``).

    A subclass sets ``removes`` (``"comprehensiveness"``: the top q% is removed; ``"sufficiency"``:
    all but the top q%) and gets the fast engine; a subclass that instead overrides
    ``_create_ablated_inputs(inputs, masks)`` is run PyHealth's way, one forward per percentage.

    Args:
        model: the model, called as ``model(**inputs)``; put in eval mode.
        percentages: percentages of each sample's attributions removed or kept.
        ablation_strategy: ``"zero" | "mean" | "noise"`` for continuous values (codes are always
            set to padding).
        sample_filter: ``(probabilities [B], classifier type) -> SampleClass [B]``.
        pack_lengths: run the ablated rows in length groups (``"auto"``: where a check shows the
            model's probabilities ignore padding).
        internal_batch_size: rows per forward (default: sized by padded positions on the CPU, every
            row of a group on CUDA, halved on out-of-memory).
        scorer: the engine (and its padding verdicts) of another metric of the same model and
            options to share (the Evaluator's two metrics share one).
    """

    removes: str | None = None

    def __init__(self, model: Any, percentages: Sequence[float] = PERCENTAGES, ablation_strategy: str = "zero", *,
                 sample_filter: SampleFilterFn, pack_lengths: bool | str = "auto",
                 internal_batch_size: int | None = None, scorer: RemovalScorer | None = None) -> None:
        self.percentages = check_metric_options(percentages, ablation_strategy)
        check_pack_lengths(pack_lengths)
        check_count("internal_batch_size", internal_batch_size, optional=True)
        if not callable(sample_filter):
            raise TypeError(f"sample_filter must be a callable (probabilities, classifier type) -> sample classes; "
                            f"got {type(sample_filter).__name__}")
        self.model = model
        self.ablation_strategy = ablation_strategy
        self._sample_filter = sample_filter
        model.eval()
        self.classifier_type = scorer.kind if scorer is not None else classifier_type(model)
        self.scorer = scorer or RemovalScorer(model, self.classifier_type, self.percentages, ablation_strategy,
                                              sample_filter, pack_lengths=pack_lengths,
                                              internal_batch_size=internal_batch_size)

    def compute(self, inputs: dict[str, Any], attributions: dict[str, torch.Tensor],
                predicted_class: torch.Tensor | None = None, return_per_percentage: bool = False,
                debug: bool = False) -> tuple[torch.Tensor, torch.Tensor] | dict[float, torch.Tensor]:
        """Scores of a batch: ``(mean drop over percentages [B], valid [B])``, or with
        ``return_per_percentage`` ``{percentage: drops [B]}``. ``predicted_class`` is accepted and
        unused, as in PyHealth (the class is the argmax of the model's probabilities)."""
        check_attributions(self.model, inputs, attributions)
        if self.removes is None:
            originals, drops = self._loop(inputs, attributions)
        else:
            originals = self.scorer.originals(inputs)
            drops = self.scorer.drops(inputs, attributions, [self.removes], originals)[self.removes]
        if debug and return_per_percentage:
            print_debug(type(self).__name__, self.classifier_type, originals, drops, self.percentages)
        return finish(drops, originals, self.percentages, return_per_percentage)

    # PyHealth's per-percentage pieces, for subclasses that build their own ablations
    def _create_ablated_inputs(self, inputs: dict[str, Any], masks: dict[str, torch.Tensor]) -> dict[str, Any]:
        raise NotImplementedError("a RemovalBasedMetric subclass sets `removes` or overrides _create_ablated_inputs")

    def _compute_threshold_and_mask(self, attributions: dict[str, torch.Tensor],
                                    percentage: float) -> dict[str, torch.Tensor]:
        """PyHealth's masks of the top ``percentage`` percent of each sample's attributions."""
        return {key: top_masks(attr, [percentage])[0] for key, attr in attributions.items()}

    def _apply_ablation(self, inputs: dict[str, Any], masks: dict[str, torch.Tensor]) -> dict[str, Any]:
        """``inputs`` with the masked positions of each masked key removed (PyHealth's rules)."""
        out = dict(inputs)
        for key, mask in masks.items():
            value = value_of(self.model, key, inputs[key])
            ablated = ablate_rows(value, mask[None], self.ablation_strategy, value)[0]
            out[key] = with_value(self.model, key, inputs[key], ablated)
        return out

    def _loop(self, inputs: dict[str, Any], attributions: dict[str, torch.Tensor]) -> tuple[Originals, torch.Tensor]:
        prob, target, classes = get_model_predictions(self.model, inputs, self.classifier_type, self._sample_filter)
        originals = Originals(prob, target, classes)
        negative = classes == SampleClass.NEGATIVE
        signed = {k: torch.where(negative.view(-1, *[1] * (a.dim() - 1)), -a, a) for k, a in attributions.items()}
        sign = torch.where(negative, -1.0, 1.0).to(prob.dtype)
        drops = []
        for percentage in self.percentages:
            ablated = self._create_ablated_inputs(inputs, self._compute_threshold_and_mask(signed, percentage))
            after, _, _ = get_model_predictions(self.model, ablated, self.classifier_type, sample_class=classes,
                                                target_class_idx=target.clone())
            drops.append(torch.where(classes != SampleClass.IGNORE, prob * sign - after * sign, torch.zeros_like(prob)))
        return originals, torch.stack(drops)


class ComprehensivenessMetric(RemovalBasedMetric):
    """Mean drop of the explained class's probability when the top q% attributed inputs are removed
    (higher: more faithful). PyHealth's ``ComprehensivenessMetric``."""

    removes = "comprehensiveness"


class SufficiencyMetric(RemovalBasedMetric):
    """Mean drop of the explained class's probability when only the top q% attributed inputs are kept
    (lower: more faithful). PyHealth's ``SufficiencyMetric``."""

    removes = "sufficiency"


def finish(drops: torch.Tensor, originals: Originals, percentages: list[float],
           per_percentage: bool) -> tuple[torch.Tensor, torch.Tensor] | dict[float, torch.Tensor]:
    """``[P, B]`` drops as PyHealth returns them: per percentage, or their mean (summed in order)."""
    if per_percentage:
        return {p: drops[i] for i, p in enumerate(percentages)}
    total = torch.zeros_like(drops[0])
    for row in drops:
        total = total + row
    return total / len(percentages), originals.classes != SampleClass.IGNORE


def print_debug(name: str, kind: str, originals: Originals, drops: torch.Tensor, percentages: list[float]) -> None:
    """PyHealth's ``debug=True`` report, condensed: per sample its class, probability and drops."""
    print(f"[debug] {name}, {kind} classifier, {originals.probs.shape[0]} samples")
    for i, (prob, target, cls) in enumerate(zip(originals.probs.tolist(), originals.targets.tolist(),
                                                originals.classes.tolist(), strict=False)):
        per = ", ".join(f"{p}%: {d:.6f}" for p, d in zip(percentages, drops[:, i].tolist(), strict=False))
        print(f"  sample {i} [class={target}, {SampleClass(cls).name}] p={prob:.6f}  drops {per}")
