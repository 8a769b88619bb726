"""The engine's rows: one sample each, altered by a client, found once and run no-grad in length groups.

Every no-grad row method runs here: SHAP's coalitions and LIME's perturbations (rows gated between
a sample and its baseline, :mod:`fastattr.interpret.perturbation.engine`) and the faithfulness
evaluator's ablations (rows with part of a sample removed, :mod:`fastattr.metrics.removal`). A
client builds its rows vectorised, keeps each sample's distinct ones (:func:`distinct_per_sample`),
and hands them here as a table (a :class:`fastattr.interpret.features.FeatureBatch` with one entry
per row) with the function that scores a slice of it. :func:`run_rows` runs the table through
:meth:`fastattr.interpret.lengths.LengthGroups.execute`: each length group trimmed to its longest
row where :func:`trimming_allowed` passed for the batch, in forwards as large as memory allows;
rows at the batch's own width in forwards of the batch's own row count (PyHealth's forward shape,
:mod:`fastattr.interpret.chunks`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fastattr.interpret.chunks import memory_rows, positions_of, run_in_chunks
from fastattr.interpret.features import FeatureBatch, model_device
from fastattr.interpret.lengths import Group, GroupedTask, LengthGroups, place_rows
from fastattr.interpret.padding import LogitsFn, extended_difference, relative_difference, trimmed_difference

RowScores = Callable[[torch.Tensor, "list[int] | None", FeatureBatch], torch.Tensor]
"""``scores(rows, sizes, part)``: the scores (``[n]`` or ``[n, C]``) of the table's ``rows`` (LongTensor),
``part`` their features cut to the padded ``sizes`` (``None``: the table's full width)."""


def distinct_per_sample(columns: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct rows of each sample among ``columns`` (each ``[N, B, ...]``: draw, sample):
    ``(draw [U], sample [U])`` of one representative each (its first draw), and ``inverse [N * B]``
    (row-major) into them. Found where the columns are (no copy off the device)."""
    total, size = columns[0].shape[:2]
    device = columns[0].device
    flat_index = torch.arange(total * size, device=device)
    sample = torch.arange(size, dtype=torch.float64, device=device).expand(total, size).reshape(total * size, 1)
    flat = [c.reshape(total * size, -1).double() for c in columns]
    _, inverse = torch.unique(torch.cat([sample, *flat], dim=1), dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), total * size, dtype=torch.long, device=device)
    first = first.scatter_reduce(0, inverse, flat_index, reduce="amin")
    return first // size, first % size, inverse


def trimming_allowed(lengths: LengthGroups, features: FeatureBatch, pack: Any, logits: LogitsFn,
                     reference: torch.Tensor | None = None, *, method: str | None = None) -> bool:
    """The padding check of a batch whose rows may run trimmed: its samples' ``logits`` (called as the
    rows call the model) in the batch's own length groups against the batch as given (``reference``:
    those logits when already computed), or, where the batch alone plans no groups (one patient, equal
    lengths, too little to save), with one more padding position along every padded dim: a table of
    many rows may still be grouped, or a row trimmed below its sample's width where its alteration
    left trailing padding. The verdict is the batch's own (:meth:`LengthGroups.allows`: a model known
    to depend on padding is refused, a failure is recorded as the model's)."""
    if pack is False:
        return False
    device = model_device(lengths.model)

    def probe(_: Any) -> float:
        whole = reference if reference is not None else logits(features)
        groups = lengths.plan(features, pack=True, points=1, device=device, method=method)
        if groups is not None:
            return trimmed_difference(logits, features, groups, whole)
        return extended_difference(logits, features, [(torch.arange(features.size), features.padded_sizes())], whole)
    return lengths.allows(features, pack, None, probe)


def run_rows(lengths: LengthGroups, table: FeatureBatch, key: tuple, scores: RowScores, *, pack: Any,
             batch_rows: int | None = None, rows_per_forward: int | None = None,
             check_rows: torch.Tensor | None = None, method: str | None = None) -> torch.Tensor:
    """The scores of every row of ``table``, in batch order: in length groups where ``pack`` allows
    (the caller's :func:`trimming_allowed`) and the once-per-``key`` check of the rows themselves
    passes, else at the table's width.

    Forwards hold ``rows_per_forward`` rows when given; else rows at the table's width run ``batch_rows``
    at a time (the last forward filled up to that count), and trimmed rows as many as memory allows
    (halved on CUDA out-of-memory). ``check_rows`` (bool ``[R]``): the rows the once-per-``key`` check
    runs padded and trimmed (default every row, whose padded results are then reused)."""
    device = model_device(lengths.model)

    def run(group: Group | None, part: FeatureBatch, only: torch.Tensor | None = None) -> torch.Tensor:
        index, sizes = (torch.arange(table.size), None) if group is None else group
        keep = torch.arange(len(index)) if only is None else only[index].nonzero().flatten()
        if len(keep) == 0:  # a group without one of the rows the check runs
            return torch.zeros(len(index), device=device)

        def forward(chosen: slice | torch.Tensor) -> torch.Tensor:
            picked = keep[chosen]
            return scores(index[picked], sizes, part.subset(picked))
        chunk, fill = _chunking(group is None, len(keep), part, device, batch_rows, rows_per_forward)
        out = run_in_chunks(forward, len(keep), chunk, fill=fill)
        if only is None:
            return out
        return out.new_zeros(len(index), *out.shape[1:]).index_put_((keep.to(out.device),), out)

    check_run = None if check_rows is None else (lambda group, part: run(group, part, check_rows))
    task = GroupedTask(run, lambda parts: place_rows(table.size, [(i, r) for i, _, r in parts]),
                       difference=relative_difference, check_run=check_run)
    result, _ = lengths.execute(table, key, task, pack=pack, points=1, device=device, method=method)
    return result


def _chunking(padded: bool, rows: int, part: FeatureBatch, device: torch.device, batch_rows: int | None,
              rows_per_forward: int | None) -> tuple[int, bool]:
    """Rows per forward, and whether the last forward is filled up to that count (see :func:`run_rows`)."""
    if rows_per_forward is not None:
        return rows_per_forward, False
    if padded and batch_rows is not None:
        return batch_rows, True
    return memory_rows(rows, positions_of([part.value(k).shape for k in part.keys]), device), False
