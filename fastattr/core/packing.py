"""Length-aware grouping: split a padded batch into groups of samples with similar lengths, so
each group runs padded only to its own longest sample.

Model-agnostic: it sees per-sample lengths along every padded dim and which dims belong to one
feature; :class:`fastattr.interpret.features.FeatureBatch` supplies both and does the cutting.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# A group's fixed cost in row-positions, the unit of the padded work (one row, i.e. one sample at
# one path point for IG, one sample for Chefer, at one position of one feature), per method and
# device: what a group adds beyond its padded work (its own forwards and backwards, dispatch).
#
# IG: each group adds forwards of its own and a chunk-size probe. Measured on the 2-core reference
# CPU with PyHealth's 2-layer, dim-64 Transformer, 32 long-tailed patients, 51 path points
# (benchmarks/RESULTS.md, "Length-aware packing"): costs from 1,600 to 6,500 row-positions ran
# within 4% of one another (5.0-5.1x PyHealth), 400 was 17% slower (more, smaller groups).
# On CUDA, where small clinical models are launch-bound, a group's forwards cost far more: on an
# H100 (same batch, dims 64 and 128) costs of 30,000-100,000 split it in two groups, 1.2-1.8x
# faster than the padded batch with a fifth of its memory; 10,000 (three groups) and 400,000
# (one) were slower.
#
# IG's adaptive rounds (``steps="auto"``): a round lists a few rows per sample (9 in the first, 4-28
# in later ones), and a group adds its forwards but, past the first round, no chunk-size probe.
# Measured on the 2-core reference CPU (benchmarks/RESULTS.md, "steps='auto' plans its own length
# groups"): `python -m benchmarks.long_tail groups --methods ig-auto` (PyHealth's 2-layer, 4-head
# Transformer, 128 long-tailed patients) ran 100-1,000 within 5% of one another and 3,000 1.28x
# slower; on the demo's trained Transformer `python -m benchmarks.ig_accuracy` went from 1.38x to
# 1.62x the speed of `steps=50` with 1,000 instead of 3,000. On CUDA not measured: the IG figure.
#
# Chefer: one forward with attention hooks, one backward and the relevance per group, one row per
# sample. Measured on the 2-core reference CPU (`python -m benchmarks.long_tail groups`, PyHealth's
# 4-layer, dim-64 Transformer, 512 long-tailed patients in batches of 32, benchmarks/RESULTS.md):
# 300 was fastest (3 groups in a batch); 100 and 1,000 were 1.18x and 1.07x slower, 0 (a group
# per length) 2.9x, one group (no packing) 5.8x. On CUDA not measured yet: the IG figure is used
# (the same unit, one forward and backward per group there too).
GROUP_COST = {
    "integrated_gradients": {"cpu": 3000.0, "cuda": 50000.0},
    "adaptive_integrated_gradients": {"cpu": 1000.0, "cuda": 50000.0},
    "chefer": {"cpu": 300.0, "cuda": 50000.0},
    "evaluator": {"cpu": 300.0, "cuda": 50000.0},
    # SHAP's and LIME's gated rows: no-grad forwards like the evaluator's (not measured on their own)
    "perturbation": {"cpu": 300.0, "cuda": 50000.0},
}


# What running a batch trimmed costs beyond its groups, in padded rows of the method's own work: the
# padding check of every trimmed batch (fastattr.interpret.padding). Chefer: one no-grad forward of
# the padded batch, about a third of its forward and backward; IG: two no-grad forwards of the padded
# batch (input and baseline; the trimmed ones cost about what trimming saves them), against (steps + 1)
# forwards and backwards per sample. Without it, a batch whose padding is cheap was split into groups
# that cost more than it saved (measured, benchmarks/RESULTS.md "PyHealth's MIMIC-IV example").
CHECK_ROWS = {"integrated_gradients": 2 / 3, "adaptive_integrated_gradients": 2 / 3, "chefer": 1 / 3,
              "evaluator": 0.0, "perturbation": 0.0}
# Methods whose work grows with each feature's first padded dim only (its tokens): Chefer's cost is the
# model's attention over the tokens, and a nested feature's codes within a visit are summed into one
# token by the models that have Chefer's protocol. IG and the evaluator count every padded position.
TOKEN_WORK = {"chefer"}


def group_cost(method: str, device: torch.device) -> float:
    """The fixed cost of one group of ``method`` on ``device``'s type (CUDA's for other accelerators)."""
    costs = GROUP_COST[method]
    return costs.get(device.type, costs["cuda"])


# Most candidate group boundaries considered (quantiles of the sorted order past this many samples).
MAX_CUTS = 128


def padded_work(sizes: np.ndarray, spans: Sequence[int]) -> np.ndarray:
    """Positions per sample for padded sizes ``[..., D]``: per feature the product of its dims'
    sizes (``spans`` says how many consecutive columns each feature owns), summed over features."""
    work = np.zeros(sizes.shape[:-1], dtype=np.float64)
    col = 0
    for span in spans:
        work += np.prod(sizes[..., col:col + span].astype(np.float64), axis=-1) if span else 1.0
        col += span
    return work


def plan_groups(lengths: torch.Tensor, spans: Sequence[int], points: int | Sequence[int],
                group_cost: float) -> list[tuple[torch.Tensor, list[int]]]:
    """Groups ``[(sample index, padded sizes), ...]`` minimising the padded work (samples x
    ``points`` x padded positions) plus ``group_cost`` per group, over contiguous runs of the
    samples sorted by their own work.

    Args:
        lengths: ``[B, D]`` integer lengths per sample along every padded dim.
        spans: columns of ``lengths`` owned by each feature (sums to ``D``).
        points: rows each sample runs as (path points): one count for every sample, or one per sample.
        group_cost: fixed cost of one group, in row-positions.

    Deterministic: ties are broken by the sample's position. Every sample is in exactly one group.
    """
    L = lengths.cpu().numpy().astype(np.int64)
    batch = L.shape[0]
    if L.shape[1] == 0 or batch == 1:
        return [(torch.arange(batch), L.max(axis=0).tolist() if L.shape[1] else [])]
    own = padded_work(L, spans)
    order = np.lexsort(tuple(L[:, ::-1].T) + (own,))  # by own work, then lengths, then position (stable)
    L = L[order]
    rows = np.concatenate([[0.0], np.cumsum(np.broadcast_to(np.asarray(points, dtype=np.float64), (batch,))[order])])
    cuts = np.unique(np.linspace(0, batch, min(batch, MAX_CUTS) + 1).round().astype(np.int64))
    best = np.full(len(cuts), np.inf)
    best[0] = 0.0
    back = np.zeros(len(cuts), dtype=np.int64)
    for i in range(len(cuts) - 1):
        run_max = np.maximum.accumulate(L[cuts[i]:], axis=0)  # group maxima for every end
        ends = cuts[i + 1:]
        sizes = run_max[ends - cuts[i] - 1]
        cost = best[i] + (rows[ends] - rows[cuts[i]]) * padded_work(sizes, spans) + group_cost
        better = cost < best[i + 1:]
        best[i + 1:] = np.where(better, cost, best[i + 1:])
        back[i + 1:] = np.where(better, i, back[i + 1:])
    groups = []
    j = len(cuts) - 1
    while j > 0:
        i = back[j]
        members = order[cuts[i]:cuts[j]]
        groups.append((torch.from_numpy(np.sort(members)), L[cuts[i]:cuts[j]].max(axis=0).tolist()))
        j = i
    return groups[::-1]


def planned_work(groups: list[tuple[torch.Tensor, list[int]]], spans: Sequence[int],
                 points: int | Sequence[int]) -> float:
    """Padded work of ``groups`` (rows x padded positions), the planner's objective without group costs."""
    rows = np.broadcast_to(np.asarray(points, dtype=np.float64), (sum(len(i) for i, _ in groups),))
    per_sample = np.zeros(len(rows))
    for index, sizes in groups:
        per_sample[index.numpy()] = padded_work(np.asarray(sizes, dtype=np.int64)[None], spans)[0]
    return float((rows * per_sample).sum())
