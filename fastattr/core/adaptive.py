"""Integrated gradients to a requested accuracy (``steps="auto"``): per sample, adaptive Simpson
panels on a dyadic grid of the path, every model evaluation reused.

Why this rule (measured, ``benchmarks/ig_accuracy.py`` and ``benchmarks/RESULTS.md``): along a trained
model's path the attribution density is smooth for most patients but has a sharp peak for some
(a saturating logit crossing over), at a place that differs per patient. Rules that refine the
whole path at once (trapezoid doubling with Romberg, Gauss-Legendre of growing order) spend the
peak's resolution on every part of every patient's path; panels refined where their own error is
large spend it only around the peak.

Each panel ``[a, b]`` holds five equally spaced points; Simpson's rule on its halves is its value.
Its error estimate is the larger of (a) the difference from Simpson's rule on the whole panel,
divided by 15, a norm over every attributed entry (so it sees each feature's error, not only the
completeness gap), and (b) ``GAP_WEIGHT`` times the panel's completeness gap: its value summed over
every entry against the change of the target logit across the panel (the forward computes the
logit at every point anyway). A peak between a panel's points escapes (a) but not (b). A sample has
converged when its panels' estimates sum to at most ``tolerance`` times the norm of its
attribution; otherwise its panels with the largest estimates are cut (in 2; in 4 or 8 when far
above their share of the budget) until the rest is under half the budget. A sample starts with two
panels (nine points) and never takes more than ``max_points``.

The rows of each round are listed as (sample, path point) and run through the same chunked
forward and input-only backward as the fixed rules (:class:`fastattr.core.integrated.ChunkRunner`);
each row's gradient becomes its attribution density (``(x - b) * grad``, summed over an embedding
dim) by the ``interpolate_rows`` / ``density`` kernels, and the quadrature is a weighted sum of
densities.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fastattr.core.chunks import ChunkSizer, RowBytes
from fastattr.core.integrated import ChunkRunner, IGOptions, IGResult, RowsForward, kernels_for
from fastattr.core.quadrature import AutoSteps

# Panels a sample starts with (five points each, ends shared: 9 points).
FIRST_PANELS = 2
# Path positions are integers in units of 1 / GRID (dyadic: halving stays exact).
GRID = 1 << 24


def density_shapes(xs: Mapping[str, torch.Tensor], summed: set[str]) -> dict[str, tuple[int, ...]]:
    """Per key, one row's attribution density shape: the path value's, without the embedding dim
    where it is summed."""
    return {k: tuple(x.shape[1:-1] if k in summed else x.shape[1:]) for k, x in xs.items()}


class ListedPath:
    """Rows given as (sample, path point): each row's gradient becomes its attribution density,
    and its target logit is kept (the path's value there)."""

    def __init__(self, samples: torch.Tensor, alphas: torch.Tensor, xs: Mapping[str, torch.Tensor],
                 bs: Mapping[str, torch.Tensor], summed: set[str], kernels: Any) -> None:
        self.samples_, self.alphas, self.xs, self.bs = samples, alphas, xs, bs
        self.summed, self.kernels, self.total = summed, kernels, len(samples)
        self.density = {k: torch.zeros((self.total, *shape), dtype=torch.promote_types(xs[k].dtype, torch.float32),
                                       device=xs[k].device) for k, shape in density_shapes(xs, summed).items()}
        self.logit = torch.zeros(self.total, dtype=torch.float64, device=samples.device)

    def samples(self, start: int, rows: int, device: torch.device) -> torch.Tensor:
        return self.samples_[start:start + rows]

    def interpolate(self, key: str, x: torch.Tensor, b: torch.Tensor, start: int, rows: int) -> torch.Tensor:
        return self.kernels.interpolate_rows(x, b, self.samples_[start:start + rows], self.alphas[start:start + rows])

    def reduce(self, key: str, grad: torch.Tensor, start: int) -> None:
        rows = grad.shape[0]
        self.density[key][start:start + rows] = self.kernels.density(
            self.xs[key], self.bs[key], self.samples_[start:start + rows], grad, key in self.summed)

    def record(self, logits: torch.Tensor, start: int) -> None:
        self.logit[start:start + len(logits)] = logits.to(self.logit.dtype)


def run_listed_rows(forward: RowsForward, xs: dict[str, torch.Tensor], bs: dict[str, torch.Tensor],
                    extra: Mapping[str, Any], options: IGOptions, samples: torch.Tensor, alphas: torch.Tensor,
                    summed: set[str], targets: torch.Tensor, per_row: RowBytes | None = None
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, ChunkSizer]:
    """Rows (sample ``samples[r]`` of ``xs`` at path point ``alphas[r]``) through the chunked
    forward and input-only backward: each row's density per key, its target logit, and the chunk
    sizer (its rows per forward; ``per_row``: the activation bytes of a row a probe measured before,
    to skip the CPU probe)."""
    path = ListedPath(samples, alphas, xs, bs, summed, kernels_for(options, xs))
    runner = ChunkRunner(forward, xs, bs, dict(extra), options, False, path, per_row=per_row)
    runner.run(targets)
    return path.density, path.logit, runner.sizer


# What a round evaluates: [(sample, grid position), ...] -> (density per key [R, *shape], target logit [R])
Evaluate = Callable[[list[tuple[int, int]]], tuple[dict[str, torch.Tensor], torch.Tensor]]


class _Panels:
    """Every sample's path points (densities and target logits, by grid position) and panels, kept
    as tensors so a round's panels are built and judged in a few batched operations."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.density: dict[str, torch.Tensor] = {}  # [points, *shape], every round's rows appended
        self.logit: torch.Tensor | None = None
        self.where: list[dict[int, int]] = [{} for _ in range(batch)]  # grid position -> point row
        self.sample: list[int] = []  # per panel
        self.span: list[tuple[int, int]] = []
        self.live: list[bool] = []
        self.error: list[float] = []
        self.value: dict[str, torch.Tensor] = {}  # [panels, *shape]

    def wanted(self, todo: Mapping[int, list[tuple[int, int]]]) -> list[tuple[int, int]]:
        """(sample, grid position) of every point the new panels need that is not evaluated yet."""
        out = []
        for sample, panels in todo.items():
            have = self.where[sample]
            new = {start + i * (stop - start) // 4 for start, stop in panels for i in range(5)}
            out += [(sample, point) for point in sorted(new) if point not in have]
        return out

    def add_points(self, listed: list[tuple[int, int]], density: Mapping[str, torch.Tensor],
                   logit: torch.Tensor) -> None:
        first = 0 if self.logit is None else len(self.logit)
        for row, (sample, point) in enumerate(listed):
            self.where[sample][point] = first + row
        for k, d in density.items():
            self.density[k] = torch.cat([self.density[k], d]) if k in self.density else d
        self.logit = logit if self.logit is None else torch.cat([self.logit, logit])

    def add_panels(self, todo: Mapping[int, list[tuple[int, int]]]) -> None:
        """Simpson's rule on each new panel's halves (its value) and on the whole panel. Its error
        estimate is the larger of their difference / 15 (the norm over every key's entries) and
        half its completeness gap: the value summed over every entry against the change of the
        target logit across the panel, which a peak between the panel's points does not escape."""
        spans = [(s, a, b) for s, panels in todo.items() for a, b in panels]
        rows = torch.tensor([[self.where[s][a + i * (b - a) // 4] for i in range(5)] for s, a, b in spans])
        width = torch.tensor([(b - a) / GRID for _, a, b in spans], dtype=torch.float64)
        squared = torch.zeros(len(spans), dtype=torch.float64)
        summed = torch.zeros(len(spans), dtype=torch.float64)
        for k, d in self.density.items():
            f = d[rows.to(d.device)]  # [panels, 5, *shape]
            w = width.to(device=d.device, dtype=d.dtype).view(-1, *([1] * (f.dim() - 2)))
            whole = (f[:, 0] + 4 * f[:, 2] + f[:, 4]) * (w / 6)
            halves = (f[:, 0] + 4 * f[:, 1] + 2 * f[:, 2] + 4 * f[:, 3] + f[:, 4]) * (w / 12)
            squared += (halves - whole).double().pow(2).reshape(len(spans), -1).sum(dim=1).cpu()
            summed += halves.double().reshape(len(spans), -1).sum(dim=1).cpu()
            self.value[k] = torch.cat([self.value[k], halves]) if k in self.value else halves
        logit = self.logit.cpu()
        gap = (summed - (logit[rows[:, 4]] - logit[rows[:, 0]])).abs()
        self.sample += [s for s, _, _ in spans]
        self.span += [(a, b) for _, a, b in spans]
        self.live += [True] * len(spans)
        self.error += torch.maximum(squared.sqrt() / 15, gap * GAP_WEIGHT).tolist()

    def totals(self) -> dict[str, torch.Tensor]:
        """Per key ``[B, *shape]``: the sum of each sample's live panels."""
        live = [i for i, alive in enumerate(self.live) if alive]
        out = {}
        for k, v in self.value.items():
            index = torch.tensor(live, device=v.device)
            samples = torch.tensor([self.sample[i] for i in live], device=v.device)
            out[k] = torch.zeros((self.batch, *v.shape[1:]), dtype=v.dtype, device=v.device).index_add_(
                0, samples, v[index])
        return out

    def points(self) -> list[int]:
        return [len(w) for w in self.where]

    def floors(self) -> list[float]:
        """Per sample, the smallest error worth refining for: ``FLOOR`` times its largest target
        logit along the path (float32 rounds logits, and so completeness gaps, at ~1e-7 of them)."""
        logit = self.logit.abs().cpu()
        return [FLOOR * max(1.0, float(logit[list(w.values())].max())) for w in self.where]

    def path_gap(self) -> torch.Tensor:
        """Per sample, the target logit at the input minus at the baseline (both always evaluated)."""
        logit = self.logit.cpu()
        return torch.tensor([float(logit[w[GRID]] - logit[w[0]]) for w in self.where], dtype=torch.float64)


# The absolute error floor, relative to the largest logit along a sample's path (float32's resolution).
FLOOR = 1e-6
# Weight of a panel's completeness gap in its error estimate: with 0.5 and the default tolerance the
# demo's model met its targets with the fewest points (benchmarks/RESULTS.md, "IG to a requested accuracy").
GAP_WEIGHT = 0.5


def _to_split(panels: _Panels, norms: list[float], floors: list[float], tolerance: float, max_points: int
              ) -> tuple[dict[int, list[tuple[int, int]]], list[float]]:
    """The pieces each sample's worst panels are cut into next, and every sample's estimated
    relative error. Per sample, largest estimates first until the rest is within half the budget
    (``tolerance`` times the attribution's norm, and never below ``floors``: float32's resolution of
    the logits, so an attribution that is ~0 is not refined for rounding), while the cap allows the
    new points; a panel far
    above its share of the budget is cut in 4 or 8 at once (Simpson's error falls ~32x per
    halving), saving rounds. A sample within its budget, or capped, gets nothing."""
    by_sample: list[list[int]] = [[] for _ in range(panels.batch)]
    for i, alive in enumerate(panels.live):
        if alive:
            by_sample[panels.sample[i]].append(i)
    todo, relative, counts = {}, [], panels.points()
    for s, ids in enumerate(by_sample):
        left = sum(panels.error[i] for i in ids)
        relative.append(left / norms[s] if norms[s] > 0 else (0.0 if left == 0 else math.inf))
        budget = max(tolerance * norms[s], floors[s])
        if left <= budget:
            continue
        share, points, cut = budget / 2 / len(ids), counts[s], []
        for i in sorted(ids, key=lambda i: -panels.error[i]):
            a, b = panels.span[i]
            if left <= budget / 2 or points + 4 > max_points or b - a < 8:
                break
            over = max(panels.error[i] / max(share, 1e-300), 1.0)
            halvings = min(3, max(1, math.ceil(math.log(over) / math.log(32))))
            while halvings > 1 and points + 4 * (2 ** halvings - 1) > max_points:
                halvings -= 1
            pieces = 2 ** halvings
            cut += [(a + j * (b - a) // pieces, a + (j + 1) * (b - a) // pieces) for j in range(pieces)]
            panels.live[i] = False
            left -= panels.error[i]
            points += 4 * (pieces - 1)
        if cut:
            todo[s] = cut
    return todo, relative


@dataclass
class Adaptive:
    """What :func:`integrate_adaptively` returns, per sample: the attribution per key
    (``[B, *shape]``), the path points taken, the estimated relative error and the target logit's
    change along the path (input minus baseline: the convergence delta's reference)."""

    attributions: dict[str, torch.Tensor]
    points: torch.Tensor
    error: torch.Tensor
    path_gap: torch.Tensor


def integrate_adaptively(evaluate: Evaluate, batch: int, auto: AutoSteps) -> Adaptive:
    """Rounds of ``evaluate`` on the points the panels need until every sample's estimate is within
    ``auto.tolerance`` or at ``auto.max_points``."""
    panels = _Panels(batch)
    width = GRID // FIRST_PANELS
    todo = {s: [(i * width, (i + 1) * width) for i in range(FIRST_PANELS)] for s in range(batch)}
    while todo:
        listed = panels.wanted(todo)
        panels.add_points(listed, *evaluate(listed))
        panels.add_panels(todo)
        totals = panels.totals()
        squared = sum(t.double().pow(2).reshape(batch, -1).sum(dim=1) for t in totals.values())
        todo, relative = _to_split(panels, squared.sqrt().tolist(), panels.floors(), auto.tolerance, auto.max_points)
    return Adaptive(totals, torch.tensor(panels.points()), torch.tensor(relative, dtype=torch.float64),
                    panels.path_gap())


def run_adaptive_integrated_gradients(forward: RowsForward, xs: dict[str, torch.Tensor], bs: dict[str, torch.Tensor],
                                      options: IGOptions, *, targets: torch.Tensor,
                                      extra: Mapping[str, Any] | None = None,
                                      sum_last_dim: Iterable[str] = ()) -> IGResult:
    """:func:`fastattr.core.integrated.run_integrated_gradients` for ``steps="auto"`` on one batch
    (``options.auto``): the result also holds each sample's points and estimated relative error,
    and the convergence delta comes from the path's own end points (no extra forward)."""
    summed, extra, device = set(sum_last_dim), dict(extra or {}), targets.device
    used: list[ChunkSizer] = []  # the first round's probe sizes the later rounds' chunks

    def evaluate(listed: list[tuple[int, int]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        samples = torch.tensor([s for s, _ in listed], dtype=torch.long, device=device)
        alphas = torch.tensor([p / GRID for _, p in listed], dtype=torch.float64, device=device)
        density, logit, sizer = run_listed_rows(forward, xs, bs, extra, options, samples, alphas, summed, targets,
                                                per_row=used[0].per_row if used else None)
        used.append(sizer)
        return density, logit

    result = integrate_adaptively(evaluate, targets.shape[0], options.auto)
    attributions = {k: t.to(xs[k].dtype) for k, t in result.attributions.items()}
    delta = adaptive_delta(attributions, result.path_gap) if options.return_convergence_delta else None
    return IGResult(attributions, delta, used[0].rows, targets, points=result.points.to(device),
                    error=result.error.to(device))


def adaptive_delta(attributions: Mapping[str, torch.Tensor], path_gap: torch.Tensor) -> torch.Tensor:
    """The convergence delta ``sum(attributions) - (f(x) - f(b))`` from the path's end points."""
    first = next(iter(attributions.values()))
    total = sum(a.reshape(a.shape[0], -1).double().sum(dim=1) for a in attributions.values())
    return (total - path_gap.to(total.device)).to(torch.promote_types(first.dtype, torch.float32))
