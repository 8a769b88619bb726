"""Length-aware execution, one mechanism for every user: IG, Chefer and the faithfulness evaluator.

A clinical batch is padded to its longest patient. Where a model's output provably ignores padding,
each group of samples of similar length runs trimmed to its own longest along every padded dim,
and the results go back to the batch's shape with exact zeros at the trimmed positions.
:class:`LengthGroups` plans the groups (:func:`fastattr.core.packing.plan_groups`, with the
method's measured per-group cost) and checks, on every batch it trims, that trimming changes nothing
(:mod:`fastattr.interpret.padding`: IG probes the logits at the input and the baseline before its
groups run, Chefer compares its groups' logits with one padded forward, the evaluator pads the batch
further); a model that fails is remembered for good and runs padded, as in PyHealth.
:meth:`LengthGroups.execute` is the whole sequence (plan, check, run each group, put the results
back, fall back to the padded batch); each user hands it a :class:`GroupedTask`, the functions that
differ. :class:`fastattr.interpret.features.FeatureBatch` does the cutting and the putting back.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from fastattr.core.packing import CHECK_ROWS, TOKEN_WORK, group_cost, plan_groups, planned_work
from fastattr.interpret.features import FeatureBatch, scatter_rows
from fastattr.interpret.padding import (
    PADDING_RTOL,
    PaddingReport,
    input_logits,
    known_dependence,
    layout_key,
    record_dependence,
    relative_difference,
    report_for,
)

Group = tuple[torch.Tensor, list[int]]
Result = TypeVar("Result")


@dataclass
class GroupedTask(Generic[Result]):
    """What one user of :meth:`LengthGroups.execute` does with a batch.

    Attributes:
        run: ``run(group, part)``: the work on ``part``, the samples of ``group = (index, padded
            sizes)`` cut from the batch (``group`` is ``None`` and ``part`` the batch itself for the
            padded run).
        place: the groups' results ``[(index, part, result), ...]`` as one result for the whole
            batch, or ``None`` when they cannot be put back in one shape.
        probe: the padding check of this batch before any group runs (``probe(groups) -> worst``
            relative difference of the logits, padded against trimmed); a failure is the model's.
        own_probe: a check of this batch before any group runs of what only this method feeds the
            model (IG's baseline); a failure is kept for this interpreter and layout, not reported as
            the model's.
        check: the padding check of this batch after the groups ran (``check(placed) -> worst``), for a
            task whose groups compute the logits anyway.
        difference: a further check made once per model and layout (``key``) after the groups ran: the
            worst relative difference between the padded batch's result and the placed groups' (both
            made by ``check_run``), for what the logits alone may not show (Chefer's relevance).
        check_run: what that check runs (default ``run``; Chefer checks in float32 whatever the
            precision). When it is ``run``, the check's padded result is reused.
    """

    run: Callable[[Group | None, FeatureBatch], Result]
    place: Callable[[list[tuple[torch.Tensor, FeatureBatch, Result]]], Result | None]
    probe: Callable[[list[Group]], float] | None = None
    own_probe: Callable[[list[Group]], float] | None = None
    check: Callable[[Result], float] | None = None
    difference: Callable[[Result, Result], float] | None = None
    check_run: Callable[[Group | None, FeatureBatch], Result] | None = None


class LengthGroups:
    """Length groups of a batch for one interpreter, with the padding checks that allow them.

    :meth:`plan` gives the groups; :meth:`execute` runs a task in them where the batch's padding
    check passes (:meth:`allows`). A failed check is remembered for the model and feature layout
    by every interpreter (:func:`fastattr.interpret.padding.record_dependence`, one warning per
    model); a passed one holds for its batch only. Checks made once per layout (``difference``,
    the evaluator's kinds of ablated rows) keep their verdicts here.

    Args:
        model: the interpreter's model (named in warnings and errors).
        method: which measured group cost applies (a key of
            :data:`fastattr.core.packing.GROUP_COST`; a call may name another, e.g. IG's adaptive rounds).
        what: what the check compares, for the messages ("logits", "logits and relevance").
        quiet: a failed once-per-layout check is kept here only, not reported as the model's (the
            evaluator's kinds of ablated rows: rows whose scores depend on the padded width are
            PyHealth's definition, not a defect of the model).
    """

    def __init__(self, model: Any, method: str, what: str, *, quiet: bool = False) -> None:
        self.model, self.method, self.what, self.quiet = model, method, what, quiet
        self.verdicts: dict[tuple, tuple[bool, float]] = {}

    def plan(self, features: FeatureBatch, *, pack: Any, points: int | Sequence[int],
             device: torch.device, method: str | None = None) -> list[Group] | None:
        """The groups ``[(sample index, padded sizes), ...]`` to run, or ``None`` to run the batch as
        it is (packing off, or nothing to trim); ``method``: whose group cost applies (default the
        interpreter's)."""
        if pack is False:
            return None
        method = method or self.method
        cost, lengths, spans, full = group_cost(method, device), features.lengths(), features.padded_spans(), \
            features.padded_sizes()
        if method in TOKEN_WORK:  # planned on each feature's first padded dim; every dim cut to the group's longest
            columns = [sum(spans[:i]) for i, span in enumerate(spans) if span]
            spans = [1] * len(columns)
        else:
            columns = list(range(len(full)))
        planned = plan_groups(lengths[:, columns], spans, points, cost)
        groups = [(index, lengths[index].amax(dim=0).tolist()) for index, _ in planned]
        if len(groups) == 1 and groups[0][1] == full:
            return None
        padded = planned_work([(torch.arange(features.size), [full[c] for c in columns])], spans, points)
        check = CHECK_ROWS[method] * padded / _mean(points)
        if planned_work(planned, spans, points) + cost * len(planned) + check >= padded + cost:
            return None  # the groups and the padding check would cost more than the padding they save
        return groups

    def execute(self, features: FeatureBatch, key: tuple, task: GroupedTask[Result], *, pack: Any,
                points: int | Sequence[int], device: torch.device,
                method: str | None = None) -> tuple[Result, list[Group] | None]:
        """Run ``task`` on ``features`` in length groups where that is exact, else on the padded batch.

        Returns the result for the whole batch and the groups that ran (``None``: the padded batch).
        Every batch that would run trimmed is checked (``task.probe`` and ``task.own_probe`` before the
        groups run, ``task.check`` after); ``task.difference`` once per ``key`` (see :func:`layout_key`).
        A failed check falls back to the padded batch (warning once per model with ``"auto"``,
        raising with ``True``). ``method`` names the group cost that plans the groups.
        """
        groups = self.plan(features, pack=pack, points=points, device=device, method=method)
        if groups is not None and not self.allows(features, pack, groups, task.probe, key):
            groups = None
        if groups is not None and task.own_probe is not None and not self.own_check_passes(
                key, task.own_probe(groups), pack):
            groups = None
        if groups is None:
            return task.run(None, features), None
        parts = [(group, features.subset(*group)) for group in groups]
        packed = task.place([(group[0], part, task.run(group, part)) for group, part in parts])
        if packed is not None and task.check is not None and not self.passes(features, task.check(packed), pack,
                                                                               groups):
            return task.run(None, features), None
        if not self.known(key) and task.difference is not None:
            check = task.check_run or task.run
            whole = check(None, features)
            trimmed = packed if check is task.run else task.place([(g[0], p, check(g, p)) for g, p in parts])
            worst = task.difference(whole, trimmed) if trimmed is not None else float("inf")
            if not self.judge(key, worst, pack, features, groups):
                return (whole if check is task.run else task.run(None, features)), None
        if packed is None:
            return task.run(None, features), None
        return packed, groups

    def allows(self, features: FeatureBatch, pack: Any, groups: list[Group] | None,
               probe: Callable[[list[Group]], float] | None, key: tuple | None = None) -> bool:
        """Whether this batch may run trimmed: the model not known to depend on padding for its
        layout, no failed once-per-layout check for ``key``, and ``probe(groups)`` (when given)
        within :data:`PADDING_RTOL`."""
        known = known_dependence(self.model, layout_key(features))
        if known is not None:
            self.refuse(known, pack)
            return False
        if key in self.verdicts and not self.judge(key, self.verdicts[key][1], pack, features, groups or []):
            return False
        return probe is None or self.passes(features, probe(groups), pack, groups)

    def passes(self, features: FeatureBatch, worst: float, pack: Any, groups: list[Group] | None) -> bool:
        """Whether a padding check of this batch passed; a failure is recorded as the model's
        (warned once with ``"auto"``, raised with ``True``)."""
        if worst <= PADDING_RTOL:
            return True
        report = report_for(self.model, lambda part: input_logits(self.model, part), features, worst)
        record_dependence(self.model, layout_key(features), report, warn=pack == "auto")
        self.refuse(report, pack)
        return False

    def own_check_passes(self, key: tuple, worst: float, pack: Any) -> bool:
        """Whether a check of what only this method feeds the model passed; a failure is kept for
        ``key`` (this interpreter and layout) and raised with ``pack_lengths=True``."""
        if worst <= PADDING_RTOL:
            return True
        self.verdicts[key] = (False, worst)
        self.refuse(PaddingReport(type(self.model).__name__, worst, (), 0), pack)
        return False

    def refuse(self, report: PaddingReport, pack: Any) -> None:
        """With ``pack_lengths=True`` a model that depends on padding is an error."""
        if pack is True:
            raise ValueError(f"pack_lengths=True, but {report.model}'s {self.what} change when padding is trimmed "
                             f"(relative difference {report.difference:.2e} > {PADDING_RTOL:g}"
                             f"{'; padding of ' + ', '.join(report.features) if report.features else ''}): "
                             "trimming would change its results. Use "
                             "pack_lengths='auto' or False for this model")

    def known(self, key: tuple) -> bool:
        """Whether the once-per-layout check was made for ``key`` (see :func:`layout_key`)."""
        return key in self.verdicts

    def judge(self, key: tuple, worst: float, pack: Any, features: FeatureBatch, groups: list[Group]) -> bool:
        """Whether the once-per-layout check for ``key`` allows trimming; the first result is kept
        (a failure is also recorded as the model's unless ``quiet``). A passed check whose groups did
        not trim every padded dim records nothing: a dependence on padding along an untrimmed dim
        could not have shown."""
        if key not in self.verdicts:
            if worst <= PADDING_RTOL and not _exercised(groups, features):
                return True
            self.verdicts[key] = (worst <= PADDING_RTOL, worst)
            if worst > PADDING_RTOL and not self.quiet:
                return self.passes(features, worst, pack, groups)
        ok, worst = self.verdicts[key]
        if not ok and pack is True:
            self.refuse(PaddingReport(type(self.model).__name__, worst, (), 0), pack)
        return ok


def _mean(points: int | Sequence[int]) -> float:
    return float(points) if isinstance(points, int) else sum(points) / max(1, len(points))


def _exercised(groups: list[Group], features: FeatureBatch) -> bool:
    """Whether the groups trim every padded dim of the batch somewhere (so the check can see it)."""
    full = features.padded_sizes()
    return all(any(sizes[d] < size for _, sizes in groups) for d, size in enumerate(full))


def place_rows(size: int, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Per-sample rows ``[(index, rows [len(index), ...]), ...]`` of groups back in batch order."""
    return scatter_rows(parts, (size, *parts[0][1].shape[1:]))


__all__ = ["Group", "GroupedTask", "LengthGroups", "layout_key", "place_rows", "relative_difference"]
