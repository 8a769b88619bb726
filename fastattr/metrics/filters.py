"""Which samples a faithfulness metric scores, and the model's probabilities: PyHealth 2.1.0's rules.

``SampleClass``, ``threshold_sample_filter`` and ``get_model_predictions`` keep the names, signatures
and meaning of ``pyhealth.metrics.interpretability.utils``; :func:`classifier_type` reads the model's
output schema as PyHealth's ``RemovalBasedMetric`` does; :func:`probabilities` is the one reader of a
model's output for the metrics (``y_prob``, else a sigmoid or softmax of ``logit``).
"""
from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping
from enum import IntEnum
from typing import Any

import torch

#: ``(probabilities of the explained class [B], classifier type) -> SampleClass values [B]``
SampleFilterFn = Callable[[torch.Tensor, str], torch.Tensor]


class SampleClass(IntEnum):
    """How a sample is scored: ``POSITIVE`` with its attributions, ``NEGATIVE`` with them negated
    (a binary model's class-0 prediction), ``IGNORE`` not at all (score 0, invalid)."""

    POSITIVE = 1
    NEGATIVE = -1
    IGNORE = 0


def threshold_sample_filter(threshold: float = 0.5) -> SampleFilterFn:
    """PyHealth's default filter: binary and multilabel samples whose explained-class probability is
    under ``threshold`` are ``IGNORE``, every other sample ``POSITIVE`` (multiclass: all)."""

    def filter_fn(y_probs: torch.Tensor, classifier_type: str) -> torch.Tensor:
        result = torch.full((y_probs.shape[0],), SampleClass.POSITIVE, dtype=torch.long, device=y_probs.device)
        if classifier_type in ("binary", "multilabel"):
            result[y_probs < threshold] = SampleClass.IGNORE
        return result

    return filter_fn


def classifier_type(model: Any) -> str:
    """``"binary" | "multiclass" | "multilabel"`` (or another mode name, or ``"unknown"``) from the
    first entry of ``model.dataset.output_schema``, resolved as PyHealth resolves it."""
    schema = getattr(getattr(model, "dataset", None), "output_schema", None)
    if not isinstance(schema, Mapping) or not schema:
        warnings.warn(f"cannot tell whether {type(model).__name__} is binary, multiclass or multilabel (it has no "
                      "model.dataset.output_schema): probabilities are a softmax of the logits and every sample is "
                      "scored, as in PyHealth", stacklevel=3)
        return "unknown"
    entry = next(iter(schema.values()))
    resolve = getattr(model, "_resolve_mode", None)
    if callable(resolve):
        try:
            return str(resolve(entry))
        except Exception:  # PyHealth's own detection falls back the same way
            return "unknown"
    if isinstance(entry, str):
        return entry.lower()
    return entry.__name__.lower() if inspect.isclass(entry) or hasattr(entry, "__name__") else "unknown"


def probabilities(outputs: Any, kind: str) -> torch.Tensor:
    """The model's probabilities ``[B, C]`` from its output: ``y_prob``, else ``sigmoid(logit)`` for
    binary and multilabel models and ``softmax(logit)`` otherwise (PyHealth's rule)."""
    if isinstance(outputs, Mapping) and "y_prob" in outputs:
        prob = outputs["y_prob"]
    elif isinstance(outputs, Mapping) and "logit" in outputs:
        # on the logits as the model gives them (PyHealth's order: the 2-D view comes after)
        logits = outputs["logit"]
        prob = torch.sigmoid(logits) if kind in ("binary", "multilabel") else torch.softmax(logits, dim=-1)
    else:
        got = sorted(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__
        raise ValueError(f"the model's output must be a dict holding 'y_prob' or 'logit'; got {got}")
    return prob.unsqueeze(-1) if prob.dim() == 1 else prob


def classify(prob: torch.Tensor, kind: str, sample_filter: SampleFilterFn | None,
             sample_class: torch.Tensor | None = None, target_class_idx: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From probabilities ``[B, C]``: the explained class's probability, the class (the argmax unless
    given) and each sample's :class:`SampleClass` (from the filter unless given); ``IGNORE`` samples
    get probability 0 and class 0, as in PyHealth."""
    target = prob.argmax(dim=-1) if target_class_idx is None else target_class_idx
    chosen = prob.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    if sample_class is None:
        if sample_filter is None:
            raise ValueError("sample_filter must be provided if sample_class is None")
        sample_class = sample_filter(chosen, kind)
    ignored = sample_class == SampleClass.IGNORE
    chosen[ignored] = 0.0
    target[ignored] = 0
    return chosen, target, sample_class


def get_model_predictions(model: Any, inputs: dict[str, Any], classifier_type: str,
                          sample_filter: SampleFilterFn | None = None, sample_class: torch.Tensor | None = None,
                          target_class_idx: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyHealth's ``get_model_predictions``: one no-grad forward of ``inputs``; returns the explained
    class's probability ``[B]``, the class ``[B]`` and the sample classes ``[B]``."""
    with torch.no_grad():
        prob = probabilities(model(**inputs), classifier_type)
        return classify(prob, classifier_type, sample_filter, sample_class, target_class_idx)
