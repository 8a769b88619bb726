"""How far ``steps="auto"`` is from the fewest points its refinement could stop at: each patient's
path density sampled on a fine dyadic grid, the library's own adaptive rule
(:func:`fastattr.core.adaptive.integrate_adaptively`) replayed on it at a sweep of tolerances, and
per patient the fewest points of that sweep that reach an error level (an oracle that knows the
true error, which no estimate does).

    python -m benchmarks.ig_auto_bound                 # the demo's model, 128 patients (seed 1)
    python -m benchmarks.ig_auto_bound --seed 2        # another cohort

Points are per patient; "length-weighted" weighs each patient by its codes (the rows' cost grows
with them; attention's share grows faster, so long patients cost more still). The replay at the
default tolerance gives the same points and errors as ``benchmarks.ig_accuracy`` (float rounding
apart: the grid's rows run in other groups).
"""
from __future__ import annotations

import argparse
import contextlib
import warnings
from unittest import mock

import torch

import fastattr
import fastattr.interpret.gradient.ig_adaptive as ig_adaptive
from benchmarks.ig_accuracy import REFERENCE, attribute_all, demo_model
from fastattr.core.adaptive import GRID, Adaptive, integrate_adaptively
from fastattr.core.quadrature import AUTO_TOLERANCE, AutoSteps

TOLERANCES = [3e-2, 2e-2, 1e-2, 7e-3, 5e-3, 3e-3, 2e-3, 1e-3, 5e-4]


@contextlib.contextmanager
def sampled_paths(grid: int, tables: list):
    """While active, ``steps="auto"`` evaluates every sample at the ``grid + 1`` dyadic points of
    its path in one round and appends ``(densities, logits)`` to ``tables`` (attributions zero)."""
    def sample(evaluate, batch, auto):
        listed = [(s, k * (GRID // grid)) for s in range(batch) for k in range(grid + 1)]
        density, logit = evaluate(listed)
        tables.append(({k: d.reshape(batch, grid + 1, *d.shape[1:]) for k, d in density.items()},
                       logit.reshape(batch, grid + 1)))
        zeros = {k: torch.zeros(batch, *d.shape[1:], dtype=d.dtype) for k, d in density.items()}
        none = torch.zeros(batch, dtype=torch.float64)
        return Adaptive(zeros, none.long(), none, none)
    with mock.patch.object(ig_adaptive, "integrate_adaptively", sample):
        yield


def replay(table: tuple, grid: int, tolerance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The adaptive rule on a sampled batch: each patient's attribution (flattened) and points."""
    density, logit = table
    batch = logit.shape[0]

    def evaluate(listed):
        samples = torch.tensor([s for s, _ in listed])
        at = torch.tensor([p // (GRID // grid) for _, p in listed])
        if any(p % (GRID // grid) for _, p in listed):
            raise ValueError(f"the rule asked for a point between the {grid + 1} sampled ones: raise --grid")
        return {k: d[samples, at] for k, d in density.items()}, logit[samples, at]
    result = integrate_adaptively(evaluate, batch, AutoSteps(tolerance))
    flat = torch.cat([v.reshape(batch, -1).double() for _, v in sorted(result.attributions.items())], dim=1)
    return flat, result.points


def sweep(model, batches, grid: int) -> tuple[torch.Tensor, dict]:
    """Per tolerance, every patient's (relative error, points); and each patient's length."""
    ig = fastattr.IntegratedGradients(model)
    reference, _ = attribute_all(ig, batches, REFERENCE)
    tables: list = []
    with sampled_paths(grid, tables), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for batch in batches:
            ig.attribute(steps="auto", **batch)
    lengths = torch.cat([sum((v != 0).reshape(v.shape[0], -1).sum(1) for v in b.values()) for b in batches])
    runs = {}
    for tolerance in TOLERANCES:
        rows, points = zip(*(replay(t, grid, tolerance) for t in tables), strict=True)
        got = [row for batch in rows for row in batch]  # per patient: its batch's width
        errors = torch.tensor([float((g - r).norm() / r.norm().clamp_min(1e-30))
                               for g, r in zip(got, reference, strict=True)])
        runs[tolerance] = (errors, torch.cat(points).double())
    return lengths.double(), runs


def oracle(runs: dict, level: float) -> torch.Tensor:
    """Per patient, the fewest points of the sweep whose error is within ``level`` (the most
    points of the sweep where none is)."""
    errors = torch.stack([runs[t][0] for t in TOLERANCES])
    points = torch.stack([runs[t][1] for t in TOLERANCES])
    within = torch.where(errors <= level, points, torch.full_like(points, float("inf")))
    best = within.min(dim=0).values
    return torch.where(torch.isinf(best), points.max(dim=0).values, best)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--patients", type=int, default=128)
    parser.add_argument("--grid", type=int, default=1024, help="path intervals sampled (a power of 2)")
    args = parser.parse_args()
    model, batches = demo_model(args.patients, args.seed)
    lengths, runs = sweep(model, batches, args.grid)
    weigh = lambda p: float((p * lengths).sum() / lengths.sum())  # noqa: E731
    print(f"\n### the demo's Transformer, {args.patients} patients (seed {args.seed}), paths sampled at "
          f"{args.grid + 1} points\n")
    print("| stop | points per patient | length-weighted | median error | worst patient |")
    print("|---|---|---|---|---|")
    for tolerance in TOLERANCES:
        errors, points = runs[tolerance]
        name = f"tolerance {tolerance:g}" + (" (default)" if tolerance == AUTO_TOLERANCE else "")
        print(f"| {name} | {points.mean():.1f} | {weigh(points):.1f} | {errors.median():.1e} | {errors.max():.1e} |")
    for level in (2e-3, 5e-3, 1e-2):
        points = oracle(runs, level)
        print(f"| oracle: each patient within {level:g} | {points.mean():.1f} | {weigh(points):.1f} | | <= {level:g} |")
    tight, loose = oracle(runs, 2e-3), oracle(runs, 1e-2)
    cheapest = torch.argsort((tight - loose) * lengths)[: (len(tight) + 1) // 2]
    mix = loose.clone()
    mix[cheapest] = tight[cheapest]
    print(f"| oracle: the issue's targets at least cost (half within 2e-3, all within 1e-2) | {mix.mean():.1f} | "
          f"{weigh(mix):.1f} | <= 2e-3 | <= 1e-2 |")


if __name__ == "__main__":
    main()
