"""Per-code cohort statistics of an opened run, in one streaming pass over its shards (float64, in
batch order: a run made by one process and under torchrun give identical sums): how many samples
carry each code, its mean and mean absolute attribution, its importance, how often it is a sample's
top code, and with stored faithfulness scores the mean scores of the samples carrying it.
pandas comes with the ``report`` extra."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fastattr.runs.frames import (
    FAITHFULNESS,
    TARGET_RULE,
    Entries,
    OpenedRun,
    chosen_features,
    code_names,
    entries,
    need_extra,
    require_info,
    sample_classes,
    sample_scores,
)


def _per_sample_codes(e: Entries) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (sample row, code) present: the row, the code, the sample's attribution to the code
    (summed over its positions, float64) and how many positions hold it; sorted by row, code."""
    width = int(e.codes.max()) + 1
    uniq, inverse = torch.unique(e.rows * width + e.codes, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, e.values.double())
    occurrences = torch.bincount(inverse, minlength=len(uniq)).double()
    return uniq // width, uniq % width, sums, occurrences


def sample_values(store: OpenedRun, wanted: Sequence[tuple[str, int]], limit: int = 5000, *,
                  progress: bool | None = False) -> dict[tuple[str, int], np.ndarray]:
    """Per wanted (feature, code id): the attributions of the first ``limit`` samples (batch order)
    carrying it, each summed over the sample's positions holding the code. One pass; memory
    bounded by ``len(wanted) x limit``."""
    require_info(store)
    out: dict[tuple[str, int], list[np.ndarray]] = {w: [] for w in wanted}
    held = dict.fromkeys(wanted, 0)
    keys = sorted({k for k, _ in wanted})
    for _, _, tensors in tqdm(store.shards_with_positions(), total=len(store.shards), unit="shard",
                              desc="collecting", disable=None if progress is None else not progress):
        if all(n >= limit for n in held.values()):
            break
        for key in keys:
            e = entries(store, key, tensors)
            if e is None or len(e.rows) == 0:
                continue
            _, codes, sums, _ = _per_sample_codes(e)
            for (k, code) in wanted:
                if k == key and held[(k, code)] < limit:
                    got = sums[codes == code].numpy()[: limit - held[(k, code)]]
                    out[(k, code)].append(got)
                    held[(k, code)] += len(got)
    return {w: np.concatenate(v) if v else np.zeros(0) for w, v in out.items()}


class _Grid:
    """Float64 sums indexed ``[class, code]``, grown as classes and codes appear."""

    def __init__(self) -> None:
        self.data = torch.zeros(0, 0, dtype=torch.float64)

    def add(self, cls: torch.Tensor, codes: torch.Tensor, values: torch.Tensor) -> None:
        if len(codes) == 0:
            return
        rows, cols = max(self.data.shape[0], int(cls.max()) + 1), max(self.data.shape[1], int(codes.max()) + 1)
        if (rows, cols) != tuple(self.data.shape):
            grown = torch.zeros(rows, cols, dtype=torch.float64)
            grown[: self.data.shape[0], : self.data.shape[1]] = self.data
            self.data = grown
        self.data.index_put_((cls, codes), values.double(), accumulate=True)

    def sized(self, classes: int, codes: int) -> np.ndarray:
        out = np.zeros((classes, codes))
        out[: self.data.shape[0], : self.data.shape[1]] = self.data.numpy()
        return out


STATS = ("samples", "occurrences", "sum", "sum_abs", "top")
# with stored faithfulness scores: per code, the scored samples carrying it and the sums of their scores
SCORED_STATS = ("scored", *FAITHFULNESS)


@dataclass
class CodeSummary:
    """Per (feature, code, class) sums from one pass over a run; :meth:`table` turns them into
    statistics. ``class_totals[c]``: samples of class ``c``. With ``per_sample`` (what reports
    use): per sample position, its top (feature index, code) (-1 when it has no entry), summary
    class and probability of the explained class."""

    store: OpenedRun
    features: list[str]
    grids: dict[str, dict[str, _Grid]]
    class_totals: np.ndarray
    class_rule: str
    top_feature: np.ndarray | None = None
    top_code: np.ndarray | None = None
    sample_class: np.ndarray | None = None
    sample_probability: np.ndarray | None = None

    def table(self, by_class: bool = False) -> list[dict[str, Any]]:
        """Rows (dicts) per code, or per (code, class) with ``by_class``, best first by importance;
        columns as in :func:`summarize`."""
        classes = len(self.class_totals)
        annotations = self.store.info.get("annotations", {})
        rows = []
        for key in self.features:
            grids = self.grids[key]
            width = max(g.data.shape[1] for g in grids.values())
            if width == 0:
                continue
            stats = {s: grid.sized(classes, width) for s, grid in grids.items()}
            names = code_names(self.store, key, width)
            groups = [(c, self.class_totals[c:c + 1], {s: v[c] for s, v in stats.items()}) for c in range(classes)] \
                if by_class else [(None, self.class_totals, {s: v.sum(0) for s, v in stats.items()})]
            for cls, totals, agg in groups:
                total = int(totals.sum())
                for code in np.flatnonzero(agg["samples"]):
                    n = agg["samples"][code]
                    row = {"feature": key, "code_id": int(code), "code": names[code]}
                    if cls is not None:
                        row["class"] = cls
                    row.update({
                        "samples": int(n), "frequency": n / total if total else 0.0,
                        "occurrences": int(agg["occurrences"][code]),
                        "mean_attribution": agg["sum"][code] / n, "mean_abs_attribution": agg["sum_abs"][code] / n,
                        "importance": agg["sum_abs"][code] / total if total else 0.0,
                        "top_count": int(agg["top"][code]), "top_share": agg["top"][code] / total if total else 0.0,
                        "annotation": annotations.get(key, {}).get(names[code], "")})
                    if "scored" in agg:
                        scored = agg["scored"][code]
                        row.update({f"mean_{m}": agg[m][code] / scored if scored else float("nan")
                                    for m in FAITHFULNESS})
                    rows.append(row)
        rows.sort(key=lambda r: (r.get("class", 0), -r["importance"], self.features.index(r["feature"]), r["code_id"]))
        return rows


def summarize_codes(store: OpenedRun, features: Sequence[str] | None = None, *,
                    per_sample: bool = False, progress: bool | None = False) -> CodeSummary:
    """One streaming pass over the shards (memory independent of the cohort's size, apart from
    four numbers per sample with ``per_sample``), in batch order, in float64: a run made by one
    process and the same run made under torchrun give identical sums."""
    require_info(store)
    keys = chosen_features(store, features)
    scores = sample_scores(store)
    grids = {k: {s: _Grid() for s in STATS + (SCORED_STATS if scores is not None else ())} for k in keys}
    totals = torch.zeros(0, dtype=torch.float64)
    n = len(store)
    top_f = np.full(n, -1, dtype=np.int32) if per_sample else None
    top_c = np.full(n, -1, dtype=np.int64) if per_sample else None
    sample_cls = np.zeros(n, dtype=np.int64) if per_sample else None
    sample_p = np.full(n, np.nan, dtype=np.float32) if per_sample else None
    rule = None
    for positions, _, tensors in tqdm(store.shards_with_positions(), total=len(store.shards), unit="shard",
                                      desc="summarizing", disable=None if progress is None else not progress):
        size = len(positions)
        prob, _, cls, shard_rule = sample_classes(tensors, size)
        rule = rule or shard_rule
        counts = torch.bincount(cls, minlength=len(totals)).double()
        totals = torch.cat([totals, totals.new_zeros(len(counts) - len(totals))]) + counts
        groups = []  # per feature: (feature index, group rows, group codes, per-sample code sums)
        for f, key in enumerate(keys):
            e = entries(store, key, tensors)
            if e is None or len(e.rows) == 0:
                continue
            rows, codes, sums, occurrences = _per_sample_codes(e)
            g = grids[key]
            c = cls[rows]
            g["samples"].add(c, codes, torch.ones_like(sums))
            g["occurrences"].add(c, codes, occurrences)
            g["sum"].add(c, codes, sums)
            g["sum_abs"].add(c, codes, sums.abs())
            if scores is not None:
                _add_scores(g, scores, torch.as_tensor(positions)[rows], c, codes)
            groups.append((f, rows, codes, sums))
        if groups:
            rows = torch.cat([g[1] for g in groups])
            sums = torch.cat([g[3] for g in groups])
            best = torch.full((size,), float("-inf"), dtype=torch.float64).scatter_reduce(0, rows, sums, "amax")
            order = torch.arange(len(rows))
            winner = best[rows] == sums
            first = torch.full((size,), len(rows), dtype=torch.long).scatter_reduce(
                0, rows[winner], order[winner], "amin")  # ties: the first feature, then the lowest code
            starts = np.cumsum([0] + [len(g[1]) for g in groups])
            for (f, g_rows, g_codes, _), start, stop in zip(groups, starts[:-1], starts[1:], strict=False):
                won = first[(first >= start) & (first < stop)] - int(start)
                grids[keys[f]]["top"].add(cls[g_rows[won]], g_codes[won], torch.ones(len(won), dtype=torch.float64))
                if per_sample:
                    where = np.asarray(positions)[g_rows[won].numpy()]
                    top_f[where], top_c[where] = f, g_codes[won].numpy()
        if per_sample:
            sample_cls[positions], sample_p[positions] = cls.numpy(), prob.numpy()
    return CodeSummary(store, keys, grids, totals.numpy(), rule or TARGET_RULE,
                       top_f, top_c, sample_cls, sample_p)


def _add_scores(g: dict[str, _Grid], scores: dict[str, torch.Tensor], samples: torch.Tensor, cls: torch.Tensor,
                codes: torch.Tensor) -> None:
    """Per (class, code): the scored samples carrying the code, and the sums of their scores."""
    values = {m: scores[m][samples] for m in FAITHFULNESS}
    scored = ~values[FAITHFULNESS[0]].isnan()
    g["scored"].add(cls[scored], codes[scored], torch.ones(int(scored.sum()), dtype=torch.float64))
    for m, v in values.items():
        g[m].add(cls[scored], codes[scored], v[scored])


def summarize(store: OpenedRun, by_class: bool = False, features: Sequence[str] | None = None, *,
              progress: bool | None = False):
    """Per-code cohort statistics of a run, in one streaming pass over its shards, as a pandas
    DataFrame sorted by importance (highest first).

    A sample's attribution to a code is the sum of its attributions at every position holding
    that code (IG's attributions add up to the prediction's change). Columns: ``feature``,
    ``code_id``, ``code``, (``class`` with ``by_class``), ``samples`` (samples carrying the code),
    ``frequency`` (their share), ``occurrences`` (positions holding it), ``mean_attribution`` and
    ``mean_abs_attribution`` (over the samples carrying it), ``importance`` (mean absolute
    attribution over all samples, 0 where absent: frequency x strength), ``top_count`` and
    ``top_share`` (samples whose highest attribution is on this code, and their share of all
    samples), ``annotation`` (the run's annotations, e.g. "planted"); for a run scored with
    ``fastattr evaluate``, ``mean_comprehensiveness`` and ``mean_sufficiency`` of the scored
    samples carrying the code (NaN where none).

    ``class`` is the explained class, or for a model with a single output (binary; it always
    explains the positive logit) the predicted label, probability >= 0.5. The frame's
    ``attrs["class_rule"]`` says which.
    """
    pd = need_extra("pandas")
    summary = summarize_codes(store, features, progress=progress)
    columns = ["feature", "code_id", "code"] + (["class"] if by_class else []) + \
        ["samples", "frequency", "occurrences", "mean_attribution", "mean_abs_attribution", "importance",
         "top_count", "top_share", "annotation"]
    if "scored" in next(iter(summary.grids.values()), {}):
        columns += [f"mean_{m}" for m in FAITHFULNESS]
    frame = pd.DataFrame(summary.table(by_class), columns=columns)
    frame.attrs["class_rule"] = summary.class_rule
    frame.attrs["samples"] = int(summary.class_totals.sum())
    return frame
