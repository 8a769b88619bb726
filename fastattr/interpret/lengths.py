"""Length-aware execution, one mechanism for every user: IG, Chefer and the faithfulness evaluator.

A clinical batch is padded to its longest patient. Where a model's output provably ignores padding,
each group of samples of similar length runs trimmed to its own longest along every padded dim,
and the results go back to the batch's shape with exact zeros at the trimmed positions.
:class:`LengthGroups` plans the groups (:func:`fastattr.core.packing.plan_groups`, with the
method's measured per-group cost) and keeps, per model and feature layout, the verdict of a check
that trimming changes nothing (measured the first time: IG compares logits at the input and the
baseline, Chefer logits and relevance, the evaluator probabilities), warning or raising when it
fails. :meth:`LengthGroups.execute` is the whole sequence (plan, run each group, put the results
back, judge and cache the verdict, fall back to the padded batch); each user hands it a
:class:`GroupedTask`, the functions that differ. :class:`fastattr.interpret.features.FeatureBatch`
does the cutting and the putting back.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from fastattr.core.packing import group_cost, plan_groups
from fastattr.interpret.features import FeatureBatch, scatter_rows

# Results of a trimmed group may differ from the padded batch's by float rounding only (other
# shapes, other summation order); a model whose output depends on padding differs far more.
PACK_RTOL = 1e-4

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
        difference: the padding check after the groups ran: the worst relative difference between
            the padded batch's result and the placed groups' (both made by ``check_run``).
        probe: a cheaper padding check made before any group runs (``probe(groups) -> worst``);
            when given, ``difference`` is not used.
        check_run: what the padding check runs (default ``run``; Chefer checks in float32 whatever
            the precision). When it is ``run``, the check's padded result is reused.
    """

    run: Callable[[Group | None, FeatureBatch], Result]
    place: Callable[[list[tuple[torch.Tensor, FeatureBatch, Result]]], Result | None]
    difference: Callable[[Result, Result], float] | None = None
    probe: Callable[[list[Group]], float] | None = None
    check_run: Callable[[Group | None, FeatureBatch], Result] | None = None


def layout_key(features: FeatureBatch, *extra: Any) -> tuple:
    """What a cached verdict about a model may depend on: each feature's layout, rank and dtype."""
    return tuple((k, features.layouts[k].schema, features.layouts[k].token, features.value(k).dim(),
                  features.value(k).dtype) for k in features.keys) + extra


def relative_difference(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Largest absolute difference over the reference's largest magnitude (at least 1)."""
    reference, other = reference.detach().double(), other.detach().double()
    if reference.shape != other.shape:
        return float("inf")
    if reference.numel() == 0:
        return 0.0
    return float((reference - other).abs().amax() / reference.abs().amax().clamp_min(1.0))


class LengthGroups:
    """Length groups of a batch for one interpreter, with the padding check's verdicts cached.

    :meth:`plan` gives the groups; before running them, the interpreter asks :meth:`known`
    whether this model and feature layout were checked, and if not measures the worst relative
    difference between the padded batch and the trimmed groups; :meth:`judge` records and
    applies the verdict.

    Args:
        model: the interpreter's model (named in warnings and errors).
        method: which measured group cost applies (a key of
            :data:`fastattr.core.packing.GROUP_COST`; a call may name another, e.g. IG's adaptive rounds).
        what: what the check compares, for the messages ("logits", "logits and relevance").
        quiet: no warning when the check fails under ``"auto"`` (the evaluator: rows whose scores
            depend on the padded width are PyHealth's definition, not a defect the user can mend).
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
        cost = group_cost(method or self.method, device)
        groups = plan_groups(features.lengths(), features.padded_spans(), points, cost)
        if len(groups) == 1 and groups[0][1] == features.padded_sizes():
            return None
        return groups

    def execute(self, features: FeatureBatch, key: tuple, task: GroupedTask[Result], *, pack: Any,
                points: int | Sequence[int], device: torch.device,
                method: str | None = None) -> tuple[Result, list[Group] | None]:
        """Run ``task`` on ``features`` in length groups where that is exact, else on the padded batch.

        Returns the result for the whole batch and the groups that ran (``None``: the padded batch).
        The first batch of a model and layout (``key``, see :func:`layout_key`) is checked: by
        ``task.probe`` before the groups run, else by running the padded batch too and comparing
        (``task.difference``); the verdict is cached and a failed check falls back to the padded
        batch (warning once with ``"auto"``, raising with ``True``). ``method`` names the group cost
        that plans the groups (default the interpreter's).
        """
        groups = self.plan(features, pack=pack, points=points, device=device, method=method)
        if groups is not None and self.known(key) and not self.judge(key, None, pack):
            groups = None
        if groups is not None and not self.known(key) and task.probe is not None:
            groups = groups if self.judge(key, task.probe(groups), pack, _exercised(groups, features)) else None
        if groups is None:
            return task.run(None, features), None
        parts = [(group, features.subset(*group)) for group in groups]
        packed = task.place([(group[0], part, task.run(group, part)) for group, part in parts])
        if not self.known(key) and task.probe is None:
            check = task.check_run or task.run
            whole = check(None, features)
            trimmed = packed if check is task.run else task.place([(g[0], p, check(g, p)) for g, p in parts])
            worst = task.difference(whole, trimmed) if trimmed is not None else float("inf")
            if not self.judge(key, worst, pack, _exercised(groups, features)):
                return (whole if check is task.run else task.run(None, features)), None
        if packed is None:
            return task.run(None, features), None
        return packed, groups

    def known(self, key: tuple) -> bool:
        """Whether the model was checked for this layout (``key``: see :func:`layout_key`)."""
        return key in self.verdicts

    def judge(self, key: tuple, worst: float | None, pack: Any, conclusive: bool = True) -> bool:
        """Whether trimming is allowed for ``key``. The first call records ``worst`` (the check's
        largest relative difference; ``None`` once known) and, when it fails with ``"auto"``,
        warns once; with ``pack=True`` a failed check raises. A passed check that did not trim
        every padded dim (``conclusive=False``) allows this batch's groups but records nothing: a
        dependence on padding along an untrimmed dim could not have shown."""
        name = type(self.model).__name__
        if key not in self.verdicts:
            if worst is None:
                raise ValueError("the padding check's result is needed the first time a layout is seen")
            if worst <= PACK_RTOL and not conclusive:
                return True
            self.verdicts[key] = (worst <= PACK_RTOL, worst)
            if worst > PACK_RTOL and pack == "auto" and not self.quiet:
                warnings.warn(f"pack_lengths='auto': {name}'s {self.what} change when padding is trimmed (relative "
                              f"difference {worst:.2e} > {PACK_RTOL:g}), so its output depends on padding; this model "
                              "runs on the padded batch, as in PyHealth", stacklevel=4)
        ok, worst = self.verdicts[key]
        if not ok and pack is True:
            raise ValueError(f"pack_lengths=True, but {name}'s {self.what} change when padding is trimmed (relative "
                             f"difference {worst:.2e} > {PACK_RTOL:g}): trimming would change its attributions. Use "
                             "pack_lengths='auto' or False for this model")
        return ok


def _exercised(groups: list[Group], features: FeatureBatch) -> bool:
    """Whether the groups trim every padded dim of the batch somewhere (so the check can see it)."""
    full = features.padded_sizes()
    return all(any(sizes[d] < size for _, sizes in groups) for d, size in enumerate(full))


def place_rows(size: int, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Per-sample rows ``[(index, rows [len(index), ...]), ...]`` of groups back in batch order."""
    return scatter_rows(parts, (size, *parts[0][1].shape[1:]))
