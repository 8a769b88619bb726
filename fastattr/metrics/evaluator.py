"""PyHealth 2.1.0's ``Evaluator`` and ``evaluate_attribution``, on the fast engine.

Same constructor, methods and results. Differences a user sees: both metrics of a batch share one
stacked, deduplicated, length-grouped run (:mod:`fastattr.metrics.removal`); when a fastattr
interpreter computed the attributions, the unablated probabilities come from its own forward
(``last_predictions``) instead of another one; progress is a bar (on a terminal) instead of prints
after every batch, and the end-of-run sanity checks are ``warnings.warn``.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from fastattr.interpret.batches import move_batch
from fastattr.interpret.features import model_device
from fastattr.metrics.filters import SampleFilterFn, threshold_sample_filter
from fastattr.metrics.metric import (
    PERCENTAGES,
    ComprehensivenessMetric,
    SufficiencyMetric,
    check_attributions,
    finish,
    print_debug,
)
from fastattr.metrics.removal import METRICS, Originals


class Evaluator:
    """Comprehensiveness and sufficiency of attributions, per batch or over a dataset.

    Args:
        model: the model the attributions explain.
        percentages: percentages of each sample's attributions removed or kept.
        ablation_strategy: ``"zero" | "mean" | "noise"`` for continuous values.
        sample_filter: which samples are scored and how (default ``threshold_sample_filter(0.5)``).
        positive_threshold: deprecated (PyHealth's): ``threshold_sample_filter(positive_threshold)``.
        pack_lengths: ``"auto" | True | False``: ablated rows run in length groups (see IG's option).
        internal_batch_size: rows per forward (default: sized on the CPU, all rows on CUDA).
        progress: progress bar in ``evaluate_attribution`` (``None``: only on a terminal).

    Examples:
        A small Transformer of fastattr's own, three classes (so every sample is scored):

        >>> import torch
        >>> from fastattr import IntegratedGradients
        >>> from fastattr.metrics import Evaluator
        >>> from fastattr.demo.models import FeatureProcessor, FeatureSpec, TransformerClassifier
        >>> _ = torch.manual_seed(0)
        >>> spec = FeatureSpec({"codes": FeatureProcessor(token=True, size=20)})
        >>> model = TransformerClassifier(spec, num_classes=3, dim=8, heads=2, layers=1)
        >>> batch = {"codes": torch.tensor([[3, 5, 7, 9], [4, 2, 0, 0]])}
        >>> attributions = IntegratedGradients(model, steps=8).attribute(**batch)
        >>> scores = Evaluator(model, percentages=[25, 50]).evaluate(batch, attributions)
        >>> sorted(scores)
        ['comprehensiveness', 'sufficiency']
        >>> per_sample, valid = scores["comprehensiveness"]  # a score and a validity flag per sample
        >>> per_sample.shape, valid.tolist()
        (torch.Size([2]), [True, True])
    """

    def __init__(self, model: Any, percentages: Sequence[float] = PERCENTAGES, ablation_strategy: str = "zero",
                 sample_filter: SampleFilterFn | None = None, positive_threshold: float | None = None, *,
                 pack_lengths: bool | str = "auto", internal_batch_size: int | None = None,
                 progress: bool | None = None) -> None:
        self.model = model
        self.percentages = percentages
        self.ablation_strategy = ablation_strategy
        self.positive_threshold = positive_threshold
        self.progress = progress
        if sample_filter is not None:
            if positive_threshold is not None:
                warnings.warn("Both sample_filter and positive_threshold were given. sample_filter takes precedence; "
                              "positive_threshold is ignored.", UserWarning, stacklevel=2)
        elif positive_threshold is not None:
            warnings.warn("positive_threshold is deprecated and will be removed in a future release. Use sample_filter "
                          "with threshold_sample_filter() instead.", DeprecationWarning, stacklevel=2)
            sample_filter = threshold_sample_filter(positive_threshold)
        self.sample_filter = sample_filter if sample_filter is not None else threshold_sample_filter(0.5)
        options = dict(percentages=percentages, ablation_strategy=ablation_strategy, sample_filter=self.sample_filter,
                       pack_lengths=pack_lengths, internal_batch_size=internal_batch_size)
        comprehensiveness = ComprehensivenessMetric(model, **options)
        self.metrics = {"comprehensiveness": comprehensiveness,  # one engine: one padding verdict per layout
                        "sufficiency": SufficiencyMetric(model, **options, scorer=comprehensiveness.scorer)}

    def evaluate(self, inputs: dict[str, Any], attributions: dict[str, torch.Tensor],
                 metrics: Sequence[str] = METRICS, return_per_percentage: bool = False, debug: bool = False,
                 *, predictions: torch.Tensor | None = None, logits: torch.Tensor | None = None) -> dict[str, Any]:
        """Per metric, ``(scores [B], valid [B])`` (or ``{percentage: drops [B]}``) for one batch.

        ``predictions``: the model's probabilities ``[B, C]`` of ``inputs`` as given, when already known
        (from an interpreter's forward), with their ``logits`` (the padding check's reference);
        otherwise one forward computes them."""
        metrics = check_metric_names(metrics)
        check_attributions(self.model, inputs, attributions)
        scorer = self.metrics["comprehensiveness"].scorer
        originals = scorer.originals(inputs, predictions, logits)
        drops = scorer.drops(inputs, attributions, metrics, originals)
        out = {}
        for name in metrics:
            if debug and return_per_percentage:
                print_debug(name, scorer.kind, originals, drops[name], scorer.percentages)
            out[name] = finish(drops[name], originals, scorer.percentages, return_per_percentage)
        return out

    def evaluate_attribution(self, dataloader: Iterable[dict[str, Any]], method: Any,
                             metrics: Sequence[str] = METRICS) -> dict[str, float]:
        """Mean of each metric over the valid samples of every batch of ``dataloader``, with the
        attributions of ``method.attribute(**batch)`` (any interpreter: fastattr's or PyHealth's);
        NaN for a metric with no valid sample."""
        metrics = check_metric_names(metrics)
        if not callable(getattr(method, "attribute", None)):
            raise TypeError(f"method must have attribute(**batch); got {type(method).__name__}")
        device = model_device(self.model)
        total, sums, valid = 0, dict.fromkeys(metrics, 0.0), dict.fromkeys(metrics, 0)
        bar = tqdm(dataloader, desc="faithfulness", unit="batch",
                   disable=None if self.progress is None else not self.progress)
        for batch in bar:
            batch = move_batch(batch, device)
            attributions = method.attribute(**batch)
            prob, logits = self._predictions(method, batch)
            results = self.evaluate(batch, attributions, metrics, predictions=prob, logits=logits)
            for name in metrics:
                scores, mask = results[name]
                sums[name] += (scores * mask).sum().item()
                valid[name] += int(mask.sum().item())
            total += len(results[metrics[0]][0])
            bar.set_postfix({n: f"{sums[n] / valid[n]:.4f}" if valid[n] else "n/a" for n in metrics})
        results = {n: sums[n] / valid[n] if valid[n] else float("nan") for n in metrics}
        sanity_warnings(results, sum(valid.values()), len(metrics) * total)
        return results

    def _predictions(self, method: Any, batch: dict[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The probabilities and logits a fastattr interpreter's forward of ``batch`` gave, when they are
        the model's ``y_prob`` of the batch as given, in float32 (else ``None``: the evaluator runs its own)."""
        known = getattr(method, "last_predictions", None)
        if getattr(method, "model", None) is not self.model or getattr(method, "last_predictions_as_given", False) \
                is not True or not isinstance(known, tuple):
            return None, None
        prob, logits = known[0], getattr(method, "last_logits", None)
        sizes = {len(v) for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
        if not isinstance(prob, torch.Tensor) or sizes != {prob.shape[0]}:
            return None, None
        return prob, logits if isinstance(logits, torch.Tensor) and logits.shape[0] == prob.shape[0] else None


def check_metric_names(metrics: Any) -> list[str]:
    """The metric names as a list; an unknown name is an error (PyHealth skips it silently)."""
    names = [metrics] if isinstance(metrics, str) else list(metrics)
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise ValueError(f"metrics must name some of {', '.join(METRICS)}; got {metrics!r}")
    return names


def sanity_warnings(results: dict[str, float], valid: int, possible: int) -> None:
    """PyHealth's end-of-run checks, as warnings."""
    comp, suff = results.get("comprehensiveness", math.nan), results.get("sufficiency", math.nan)
    if not math.isnan(comp) and not math.isnan(suff):
        if comp < 0:
            warnings.warn(f"negative comprehensiveness ({comp:.6f}): removing the top-attributed features increased "
                          "the model's confidence; the attributions may be inverted or wrong", stacklevel=3)
        if suff > comp:
            warnings.warn(f"sufficiency ({suff:.6f}) is above comprehensiveness ({comp:.6f}): keeping the top features "
                          "does worse than removing them; the attributions may not find the important features",
                          stacklevel=3)
    if possible and valid / possible < 0.1:
        warnings.warn(f"only {100 * valid / possible:.1f}% of samples were valid (scored): most were filtered out "
                      "(for the default filter, predicted negative); consider another sample_filter or a balanced set",
                      stacklevel=3)


def evaluate_attribution(model: Any, dataloader: Iterable[dict[str, Any]], method: Any,
                         metrics: Sequence[str] = METRICS, percentages: Sequence[float] = PERCENTAGES,
                         ablation_strategy: str = "zero", sample_filter: SampleFilterFn | None = None,
                         positive_threshold: float | None = None, **options: Any) -> dict[str, float]:
    """PyHealth's functional form: ``Evaluator(model, ...).evaluate_attribution(dataloader, method, metrics)``
    (``options``: the Evaluator's keyword-only extras).

    Examples:
        Any iterable of batches is a dataloader; the result is each metric's mean over the valid samples:

        >>> import torch
        >>> from fastattr import CheferRelevance, evaluate_attribution
        >>> from fastattr.demo.models import FeatureProcessor, FeatureSpec, TransformerClassifier
        >>> _ = torch.manual_seed(0)
        >>> spec = FeatureSpec({"codes": FeatureProcessor(token=True, size=20)})
        >>> model = TransformerClassifier(spec, num_classes=3, dim=8, heads=2, layers=1)
        >>> batches = [{"codes": torch.tensor([[3, 5, 7, 9], [4, 2, 0, 0]])}]
        >>> means = evaluate_attribution(model, batches, CheferRelevance(model), percentages=[25, 50])
        >>> sorted(means), all(isinstance(value, float) for value in means.values())
        (['comprehensiveness', 'sufficiency'], True)
    """
    evaluator = Evaluator(model, percentages=percentages, ablation_strategy=ablation_strategy,
                          sample_filter=sample_filter, positive_threshold=positive_threshold, **options)
    return evaluator.evaluate_attribution(dataloader, method, metrics=metrics)


__all__ = ["Evaluator", "Originals", "evaluate_attribution"]
