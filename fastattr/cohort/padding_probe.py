"""The padding probe of a cohort run: before its batches are sorted by length, whether the method's
values depend on the padding a batch adds (then sorting would change them, and
:func:`fastattr.cohort.batching.choose_batching` keeps the loader's own batches). The model's own
padding check first (cheap, no-grad), then, where it fails, the method itself on some samples alone
against batched."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from fastattr.interpret.features import FeatureBatch
from fastattr.interpret.padding import (
    PADDING_RTOL,
    PaddingReport,
    check_padding,
    known_dependence,
    layout_key,
    record_dependence,
    relative_difference,
)

# Samples read from the dataset's start to probe for padding dependence before a run's batches are
# sorted (the batches then take them over: each sample is read once). Several patients even for a
# loader of batch size 1, so the probe trims as well as pads; few, so it costs a handful of no-grad
# forwards of a small batch whatever the loader's batch size.
PADDING_PROBE_SAMPLES = 32


class PaddingFound(NamedTuple):
    """A probe's finding: the model's report, and whether the user was told of it already (an
    interpreter recorded it, warning once, before this run's probe did)."""

    report: PaddingReport
    told: bool

    def why(self) -> str:
        """The finding in a clause."""
        names = ", ".join(repr(k) for k in self.report.features)
        return f"the method's values depend on the padding of {names} ({self.report.model}'s output does)"


def padding_note(found: PaddingFound, auto: bool) -> str:
    """The warning for values that depend on padding: the batches kept as the loader's (``auto``) or
    sorted anyway (``True``), with the model's report unless the user was told of it already."""
    detail = "" if found.told else f" {found.report.message()}."
    if auto:
        return (f"attribute_dataset: batches keep the loader's order and size, not sorted by length, because "
                f"{found.why()}: each patient is attributed with the same neighbours as over the loader itself "
                f"(PyHealth's batches).{detail} Pass sort_by_length=True to sort anyway (the results then differ "
                "from the loader's batches), or sort_by_length=False to say the loader's batches are intended")
    return (f"attribute_dataset: sort_by_length=True sorts the batches by length although {found.why()}: the "
            f"results differ from those over the loader's own batches (PyHealth's).{detail} "
            "sort_by_length='auto' keeps the loader's batches in this case")


def padding_dependence(model: Any, collate: Any, samples: list[Any],
                       explain: Callable[[dict[str, Any]], Any] | None) -> PaddingFound | None:
    """Whether the method's values for ``samples`` depend on the padding their batch adds (``None``:
    they do not, or ``model`` has no ``feature_keys`` to probe).

    First the model as their batch (``collate(samples)``) calls it: the verdict the interpreters
    already recorded for the batch's feature layout
    (:func:`fastattr.interpret.padding.known_dependence`), else
    :func:`fastattr.interpret.padding.check_padding` (no-grad forwards in eval mode: the batch as
    given, and each padded feature padded further and trimmed): a cheap no-grad gate that a model
    whose output ignores padding passes. Where it fails, the method itself (``explain``) confirms
    (:func:`method_ignores_padding`): IG calls the model with each feature's mask (as DeepLift and GIM
    do), which PyHealth's StageNet and Transformer honour, so its values ignore padding that the
    model's own forward (the user's, Chefer's, the evaluator's) attends; and the model's check pads
    further along dims that no batch varies (a nested processor's codes per visit).
    A confirmed dependence is recorded for every interpreter and the evaluator
    (:func:`fastattr.interpret.padding.record_dependence`, which then never warn of it again: the
    caller's warning carries the report)."""
    if not isinstance(model, torch.nn.Module) or not getattr(model, "feature_keys", None):
        return None
    batch = collate(samples)
    layout = layout_key(FeatureBatch.from_batch(model, batch))
    report = known_dependence(model, layout)
    if report is None:
        report = check_padding(model, batch)
        if report.ignores_padding:
            return None
    if explain is not None and method_ignores_padding(explain, collate, samples, batch):
        return None
    told = known_dependence(model, layout) is not None  # recorded before, or by the method just now
    if not told:
        record_dependence(model, layout, report, warn=False)
    return PaddingFound(report, told)


# Of the probe's samples, how many the method also explains alone (the collate's batch of one) to
# confirm that its values depend on the padding a batch adds.
CONFIRM_ALONE = 8


def method_ignores_padding(explain: Callable[[dict[str, Any]], Any], collate: Any, samples: list[Any],
                           batch: dict[str, Any]) -> bool:
    """Whether the method's values for the first :data:`CONFIRM_ALONE` of ``samples`` alone (each the
    collate's batch of one: none of the padding a batch adds) equal theirs in ``batch`` (all of
    ``samples``, padded to its longest) within :data:`PADDING_RTOL` (relative, at each sample's own
    positions): 1 + :data:`CONFIRM_ALONE` calls of the method. The regrouping is the collate's, as
    sorting's is: only the dims it pads vary (a nested processor pads every visit to the widest it was
    fitted on, in every batch)."""
    together, worst = values_of(explain(batch)), 0.0
    for i, sample in enumerate(samples[:CONFIRM_ALONE]):
        for key, alone in values_of(explain(collate([sample]))).items():
            mine = together.get(key)
            if mine is None or mine.dim() != alone.dim() or alone.dim() == 0:
                return False
            worst = max(worst, relative_difference(alone[0], mine[i][tuple(slice(0, n) for n in alone.shape[1:])]))
    return worst <= PADDING_RTOL


def values_of(result: Any) -> dict[str, torch.Tensor]:
    """The attributions of an ``attribute`` call (its first element when it returns a tuple)."""
    result = result[0] if isinstance(result, tuple) else result
    return {k: v for k, v in result.items() if isinstance(v, torch.Tensor)} if isinstance(result, Mapping) else {}
