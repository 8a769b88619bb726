"""The removal-based faithfulness engine: every ablation of a batch stacked, deduplicated and run in
length groups.

PyHealth's Evaluator runs one forward of the whole padded batch per (metric, percentage). Here the
ablated rows of every (metric, percentage) are built at once from vectorised masks
(:mod:`fastattr.metrics.masks`, :mod:`fastattr.metrics.ablation`); rows of samples whose score is
thrown away (``IGNORE``) are never built; a sample's identical ablated rows (a short patient gets
the same mask at 1% and 5%) run once; and the remaining rows run as one client of the perturbation
engine that also runs SHAP's and LIME's rows (:mod:`fastattr.interpret.perturbation.rows`: its
dedup, its batch padding check, its length-grouped execution), each group trimmed to its longest
row, in as few forwards as memory allows. Exact where PyHealth's numbers are defined by its model:
rows of an eval-mode model do not interact, trimming is checked on every batch, and rows that run
at the batch's own width run in forwards of the batch's own row count, the shapes of PyHealth's
forwards, so that a row's probability is computed as PyHealth computes it (a math library may pick
its kernel, and with it the summation order, by the number of rows: measured 1.5e-6 apart on an AMD
EPYC when it was not). Trimmed rows differ from PyHealth's by float rounding only.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fastattr.interpret.batches import select_samples
from fastattr.interpret.features import FeatureBatch, FeatureLayout
from fastattr.interpret.lengths import LengthGroups, layout_key, place_rows
from fastattr.interpret.padding import input_logits
from fastattr.interpret.perturbation.rows import distinct_per_sample, run_rows, trimming_allowed
from fastattr.metrics.ablation import ablate_rows
from fastattr.metrics.filters import SampleClass, SampleFilterFn, classify, probabilities
from fastattr.metrics.masks import top_masks

METRICS = ("comprehensiveness", "sufficiency")



@dataclass
class Originals:
    """The unablated batch as the metrics see it: the explained class's probability (0 for
    ``IGNORE``), the class, each sample's :class:`SampleClass`, and the model's logits of the batch
    as given when the scorer ran that forward itself (``None`` otherwise; the padding check's reference)."""

    probs: torch.Tensor
    targets: torch.Tensor
    classes: torch.Tensor
    scores: torch.Tensor | None = None


class RemovalScorer:
    """Probability drops of many ablations of a batch, for one model and configuration.

    Args:
        model: the model (called as ``model(**batch)``, returning ``y_prob`` or ``logit``).
        kind: the classifier type (:func:`fastattr.metrics.filters.classifier_type`).
        percentages: the percentages of attributions removed (or kept).
        strategy: ``"zero" | "mean" | "noise"``.
        sample_filter: which samples are scored, and how.
        pack_lengths: ``"auto" | True | False``: run rows in length groups (see IG's option).
        internal_batch_size: rows per forward (default: see :mod:`fastattr.interpret.chunks`).
    """

    def __init__(self, model: Any, kind: str, percentages: Sequence[float], strategy: str,
                 sample_filter: SampleFilterFn, *, pack_lengths: bool | str = "auto",
                 internal_batch_size: int | None = None) -> None:
        self.model, self.kind, self.percentages = model, kind, list(percentages)
        self.strategy, self.sample_filter = strategy, sample_filter
        self.pack_lengths, self.internal_batch_size = pack_lengths, internal_batch_size
        self.lengths = LengthGroups(model, "evaluator", "probabilities", quiet=True)
        self.last_rows = 0  # ablated rows the last call ran (after skipping and deduplicating)

    # -- the two phases ----------------------------------------------------------------------
    def originals(self, inputs: Mapping[str, Any], prob: torch.Tensor | None = None,
                  scores: torch.Tensor | None = None) -> Originals:
        """The unablated probabilities, classified: ``prob [B, C]`` when known (an interpreter's forward
        of the batch as given, with its logits ``scores`` when known), else PyHealth's own call, one
        no-grad forward of the batch as given, never trimmed: the class explained and the filter's
        threshold are discrete steps that a trimmed run's float rounding could tip."""
        if prob is None:
            with torch.no_grad():
                out = self.model(**inputs)
            prob, scores = probabilities(out, self.kind), _scores(out, self.kind)
        return Originals(*classify(prob.clone(), self.kind, self.sample_filter), scores=scores)

    def drops(self, inputs: Mapping[str, Any], attributions: Mapping[str, torch.Tensor], metrics: Sequence[str],
              originals: Originals) -> dict[str, torch.Tensor]:
        """Per metric, ``[P, B]`` drops of the explained class's probability (0 for ``IGNORE``)."""
        keep = (originals.classes != SampleClass.IGNORE).nonzero().squeeze(1)
        size = originals.probs.shape[0]
        out = {m: originals.probs.new_zeros(len(self.percentages), size) for m in metrics}
        self.last_rows = 0
        if keep.numel() == 0:
            return out
        negative = originals.classes == SampleClass.NEGATIVE
        ablated = self._ablated(inputs, attributions, metrics, negative, keep)
        rows, inverse, samples = _unique_rows(ablated, random=self.strategy == "noise")
        batch = _stacked(self.model, inputs, keep[samples], {k: v[rows, samples] for k, v in ablated.items()})
        self.last_rows = len(rows)
        pack = self.pack_lengths if self.trimming_allowed(inputs, originals) else False
        probs = self.probabilities(batch, originals.targets[keep[samples]], pack=pack, batch_rows=size)
        probs = probs[inverse].reshape(-1, len(keep))
        start = originals.probs[keep]
        sign = torch.where(negative[keep], -1.0, 1.0).to(start.dtype)
        drop = (start * sign) - (probs * sign)  # PyHealth's: negated probabilities for NEGATIVE samples
        for m, metric in enumerate(metrics):
            out[metric][:, keep] = drop[m * len(self.percentages):(m + 1) * len(self.percentages)]
        return out

    # -- pieces --------------------------------------------------------------------------------
    def _ablated(self, inputs: Mapping[str, Any], attributions: Mapping[str, torch.Tensor], metrics: Sequence[str],
                 negative: torch.Tensor, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per attributed key, the ablated values ``[M * P, V, ...]`` of the kept samples: the top q%
        removed (comprehensiveness) or all but the top q% removed (sufficiency)."""
        out = {}
        for key, attr in attributions.items():
            signed = torch.where(negative.view(-1, *[1] * (attr.dim() - 1)), -attr, attr) if negative.any() else attr
            masks = top_masks(signed, self.percentages)
            removal = torch.cat([masks if m == "comprehensiveness" else 1 - masks for m in metrics])
            value = value_of(self.model, key, inputs[key])
            out[key] = ablate_rows(value.index_select(0, keep), removal.index_select(1, keep), self.strategy, value)
        return out

    def trimming_allowed(self, inputs: Mapping[str, Any], originals: Originals) -> bool:
        """The padding check of this batch (:func:`fastattr.interpret.perturbation.rows.trimming_allowed`):
        the model's logits of its samples as given (the originals' padded forward, when it made one)
        against them trimmed in the batch's length groups, or padded one position further where nothing
        of the batch can be trimmed. Ablated rows are trimmed below their samples' widths where their
        removal left trailing padding: the check is of trailing padding itself. A model that fails is
        remembered as depending on padding (:mod:`fastattr.interpret.padding`)."""
        features = FeatureBatch.from_batch(self.model, inputs)
        if self.pack_lengths is not False and not any(features.padded_spans()):
            return True
        return trimming_allowed(self.lengths, features, self.pack_lengths,
                                lambda part: input_logits(self.model, part), originals.scores)

    def probabilities(self, batch: Mapping[str, Any], targets: torch.Tensor | None = None, *,
                      pack: bool | str | None = None, batch_rows: int | None = None) -> torch.Tensor:
        """The model's probabilities of every ablated row of ``batch`` (``[N, C]``, or ``[N]`` of
        ``targets``), run in length groups where that is exact (``pack``: default the scorer's), and
        at ``batch``'s own width in forwards of ``batch_rows`` rows (the shape of PyHealth's forwards,
        when given; see the module docstring).

        Beyond the batch's padding check, a verdict is kept per layout and kind of row: ablated rows
        whose first position was removed, or with nothing left of a feature, are unlike any row of the
        data (which is left-aligned and has something of every feature) and can depend on the padded
        width where other rows do not (PyHealth's Transformer reads position 0 as its CLS token: a
        padding query there attends uniformly over every padded position; a feature with every position
        masked attends uniformly over all of them). So rows are split by which features keep their first
        position and which keep any, and each kind is checked, and trimmed or run padded, on its own."""
        pack = self.pack_lengths if pack is None else pack
        features = FeatureBatch.from_batch(self.model, batch)
        if pack is False:
            return self._rows(batch, features, targets, layout_key(features, "ablated"), pack, batch_rows)
        kinds, which = torch.unique(_row_kinds(features), dim=0, return_inverse=True)
        parts = []
        for k, kind in enumerate(kinds):
            key = layout_key(features, "ablated", tuple(kind.tolist()))
            if len(kinds) == 1:
                return self._rows(batch, features, targets, key, pack, batch_rows)
            index = (which == k).nonzero().squeeze(1)
            rows = select_samples(batch, index, features.size)
            chosen = None if targets is None else targets[index.to(targets.device)]
            part = FeatureBatch.from_batch(self.model, rows)
            parts.append((index, self._rows(rows, part, chosen, key, pack, batch_rows)))
        return place_rows(features.size, parts)

    def _rows(self, batch: Mapping[str, Any], table: FeatureBatch, targets: torch.Tensor | None, key: tuple,
              pack: bool | str, batch_rows: int | None) -> torch.Tensor:
        """The rows of ``batch`` (``table``: their features) through the perturbation engine
        (:func:`fastattr.interpret.perturbation.rows.run_rows`), ``internal_batch_size`` rows per
        forward when set."""
        rest = {k: v for k, v in batch.items() if k not in table.keys}

        def scores(rows: torch.Tensor, _: list[int] | None, part: FeatureBatch) -> torch.Tensor:
            prob = probabilities(self.model(**select_samples(rest, rows, table.size), **part.inputs()), self.kind)
            if targets is None:
                return prob
            return prob.gather(-1, targets[rows.to(targets.device)].to(prob.device).unsqueeze(-1)).squeeze(-1)
        return run_rows(self.lengths, table, key, scores, pack=pack, batch_rows=batch_rows,
                        rows_per_forward=self.internal_batch_size)


def _row_kinds(features: FeatureBatch) -> torch.Tensor:
    """``[B, 2K]`` bool per row, for the K features with padded dims: whether its first position holds
    data, and whether any position does."""
    padded = [k for k, span in zip(features.keys, features.padded_spans(), strict=True) if span]
    if not padded:
        return features.leading_present()
    anything = torch.stack([features.mask(k).ne(0).reshape(features.size, -1).any(1).cpu() for k in padded], 1)
    return torch.cat([features.leading_present(), anything], dim=1)


def _scores(out: Any, kind: str) -> torch.Tensor:
    """What the padding check compares: the model's logits (its probabilities when it gives none)."""
    if isinstance(out, Mapping) and "logit" in out:
        logits = out["logit"]
        return (logits.unsqueeze(-1) if logits.dim() == 1 else logits).float()
    return probabilities(out, kind).float()


def value_of(model: Any, key: str, feature: Any) -> torch.Tensor:
    """The value tensor of ``feature``: by its schema for a model feature key, else the tensor itself."""
    if key in getattr(model, "feature_keys", ()):
        return FeatureLayout.of(model, key).value(feature)
    if not isinstance(feature, torch.Tensor):
        raise TypeError(f"inputs[{key!r}] is not one of the model's feature keys, so it must be a tensor to be "
                        f"ablated; got {type(feature).__name__}")
    return feature


def with_value(model: Any, key: str, feature: Any, value: torch.Tensor) -> Any:
    """``feature`` with its value replaced (by schema for a feature key); a bare tensor stays bare."""
    if isinstance(feature, torch.Tensor):
        return value
    return FeatureLayout.of(model, key).replace_value(feature, value)


def _unique_rows(ablated: dict[str, torch.Tensor], *, random: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct ablated rows of each sample (:func:`fastattr.interpret.perturbation.rows.distinct_per_sample`):
    ``(row, sample)`` positions (into ``[R, V]``) of one representative each, and for every ``(row,
    sample)`` (flattened row-major) its representative. Rows with noise are never identical: no search."""
    if random:
        total, kept = next(iter(ablated.values())).shape[:2]
        flat_index = torch.arange(total * kept, device=next(iter(ablated.values())).device)
        return flat_index // kept, flat_index, flat_index % kept
    rows, samples, inverse = distinct_per_sample(list(ablated.values()))
    return rows, inverse, samples


def _stacked(model: Any, inputs: Mapping[str, Any], samples: torch.Tensor,
             values: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A batch of the rows ``samples`` of ``inputs`` (ids, labels and time slots included) with
    ``values`` in the value slot of their keys."""
    batch = select_samples(inputs, samples)
    for key, value in values.items():
        batch[key] = with_value(model, key, batch[key], value)
    return batch
