"""From an opened run's attribution shards to tables: decoded long rows, parquet/CSV export, and
per-code cohort statistics computed in one streaming pass. The functions take a run opened by
:func:`fastattr.tools.store.load_attributions` (:mod:`fastattr.tools.tables` takes folders too).

Long format: one row per (sample, feature, visit, position) that is not padding, columns

- ``sample`` (int64): the sample's position in the dataset (the key of ``load_attributions``);
- ``patient_id``, ``visit_id`` (string; ``visit_id`` null where the dataloader gave none);
- ``feature`` (string); ``visit`` (int32, the visit of a nested sequence, -1 for flat ones);
- ``position`` (int32, inside the visit or the sequence; the time step of a continuous value);
- ``code_id`` (int64, the token id; for a continuous feature its channel, the value's last dim);
- ``code`` (string, decoded through the run's vocabulary; the id as text where there is none);
- ``attribution`` (the stored dtype; bfloat16 becomes float32);
- ``probability`` (float32, the predicted probability of the explained class; NaN when not
  stored) and ``target`` (int64, the explained class; -1 when not stored).

pandas and pyarrow come with the ``report`` extra (``pip install "fastattr[report]"``).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from fastattr.core.checks import check_count


class Attributions(Protocol):
    """What these functions read of an opened run (:class:`fastattr.tools.store.Attributions`)."""

    out: Path
    info: dict[str, Any] | None
    shards: dict[str, dict]

    def __len__(self) -> int: ...

    def shards_with_positions(self) -> Iterator[tuple[list[int], dict[str, list], dict[str, torch.Tensor]]]: ...

    def scores(self) -> Any: ...

FORMATS = ("parquet", "csv")
ROW_GROUP_ROWS = 1 << 18


def _need(module: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:
        raise ImportError(f"fastattr tables and reports need {module.split('.')[0]}: "
                          f"pip install \"fastattr[report]\"") from exc


def require_info(store: Attributions) -> Attributions:
    """``store``, checked to carry the ``run.json`` that tables need."""
    if store.info is None:
        raise ValueError(f"{store.out} has no run.json: it was written by a fastattr before runs stored their "
                         "vocabulary and token ids; attribute it again to get tables and reports")
    return store


def _features(store: Attributions, features: Sequence[str] | None) -> list[str]:
    known = list(store.info["features"])
    if features is None:
        return known
    unknown = [k for k in features if k not in known]
    if unknown:
        raise ValueError(f"features {unknown} are not in the run {store.out}; it has {known}")
    return list(features)


def code_names(store: Attributions, key: str, count: int) -> list[str]:
    """Names of ids ``0 .. count - 1`` of feature ``key``: the run's vocabulary, the id as text
    where the vocabulary has no name; a continuous feature's channels ``key[c]`` unless named."""
    feature = store.info["features"][key]
    vocab = feature.get("vocab") or []
    default = (lambda i: str(i)) if feature["token"] else (lambda i: f"{key}[{i}]")
    return [vocab[i] if i < len(vocab) and vocab[i] is not None else default(i) for i in range(count)]


def has_vocab(store: Attributions, key: str) -> bool:
    return bool(store.info["features"][key].get("vocab"))


TARGET_RULE = "explained class (target)"
PREDICTED_RULE = "predicted label (probability >= 0.5; a single-output model explains its positive logit)"


def _classes(tensors: dict[str, torch.Tensor], size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """Per sample: (probability of the explained class, explained class, summary class), and what
    the summary class is. It is the explained class, except for a single-output model, whose
    explained logit is always the positive one: there it is the predicted label (p >= 0.5)."""
    target = tensors["target"].long() if "target" in tensors else torch.full((size,), -1, dtype=torch.long)
    if "probability" not in tensors:
        return torch.full((size,), float("nan")), target, target.clamp_min(0), TARGET_RULE
    prob = tensors["probability"].float().reshape(size, -1)
    if prob.shape[1] == 1:
        p = prob[:, 0]
        return p, target, (p >= 0.5).long(), PREDICTED_RULE
    return prob.gather(1, target.clamp_min(0)[:, None])[:, 0], target, target.clamp_min(0), TARGET_RULE


@dataclass
class _Entries:
    """One feature of one shard, padding left out: per kept entry its row in the shard, visit,
    position, code id and attribution."""

    rows: torch.Tensor
    visit: torch.Tensor
    position: torch.Tensor
    codes: torch.Tensor
    values: torch.Tensor


def entries(store: Attributions, key: str, tensors: dict[str, torch.Tensor]) -> _Entries | None:
    """Feature ``key``'s non-padding entries in a shard's (or a sample's, with a batch dim of 1)
    tensors: rows, visits (-1 when flat), positions, code ids and attributions; ``None`` when the
    shard has no attribution for ``key``."""
    attr = tensors.get(f"attr/{key}")
    if attr is None:
        return None
    keep = tensors.get(f"keep/{key}")
    keep = torch.ones(attr.shape, dtype=torch.bool) if keep is None else keep.bool()
    index = keep.nonzero()
    token = store.info["features"][key]["token"]
    if token:
        ids = tensors.get(f"input/{key}")
        if ids is None:
            raise ValueError(f"{store.out}: the shards hold no token ids for feature {key!r} (written by an older "
                             "fastattr, or its attributions are not in the input's shape), so its codes cannot be "
                             "decoded")
        codes, places = ids[keep].long(), index[:, 1:]
    else:  # a continuous value: the last dim is the channel
        codes = index[:, -1] if attr.dim() > 1 else torch.zeros(len(index), dtype=torch.long)
        places = index[:, 1:-1]
    none = torch.full((len(index),), -1, dtype=torch.long)
    if places.shape[1] == 0:
        visit, position = none, torch.zeros(len(index), dtype=torch.long)
    elif places.shape[1] == 1:
        visit, position = none, places[:, 0]
    else:  # visits, then the position inside the visit (further dims flattened, row-major)
        visit, position = places[:, 0], places[:, 1]
        for d in range(2, places.shape[1]):
            position = position * keep.shape[1 + d] + places[:, d]
    values = attr[keep]
    if values.dtype == torch.bfloat16:
        values = values.float()
    return _Entries(index[:, 0], visit, position, codes, values)


class _Names:
    """Decoded code names per feature as Arrow string arrays, extended as larger ids appear."""

    def __init__(self, store: Attributions) -> None:
        self.store, self.arrays = store, {}

    def take(self, key: str, codes: torch.Tensor):
        pa = _need("pyarrow")
        need = int(codes.max()) + 1 if len(codes) else 0
        if key not in self.arrays or len(self.arrays[key]) < need:
            size = max(need, len(self.store.info["features"][key].get("vocab") or []))
            self.arrays[key] = pa.array(code_names(self.store, key, size), pa.string())
        return self.arrays[key].take(pa.array(codes.numpy()))


def sample_scores(store: Attributions) -> dict[str, torch.Tensor] | None:
    """Per sample position, the faithfulness scores ``fastattr evaluate`` stored for the run:
    ``comprehensiveness`` and ``sufficiency`` (NaN where the patient was not scored); ``None``
    when the run was not scored."""
    scores = store.scores()
    if scores is None:
        return None
    rows = scores.all()
    return {m: torch.where(rows["valid"], rows[m], torch.tensor(float("nan"))) for m in FAITHFULNESS}


def tables(store: Attributions, features: Sequence[str] | None = None, *,
           progress: bool | None = False) -> Iterator[Any]:
    """The run's long table (module docstring), one ``pyarrow.Table`` per shard, in batch order."""
    pa = _need("pyarrow")
    require_info(store)
    keys = _features(store, features)
    names = _Names(store)
    scores = sample_scores(store)
    for positions, ids, tensors in tqdm(store.shards_with_positions(), total=len(store.shards), unit="shard",
                                        desc="reading shards", disable=None if progress is None else not progress):
        size = len(positions)
        prob, target, _, _ = _classes(tensors, size)
        pid = pa.array(ids["patient_id"], pa.string())
        vid = pa.array(ids.get("visit_id", [None] * size), pa.string())
        sample = torch.tensor(positions, dtype=torch.long)
        parts = []
        for key in keys:
            e = entries(store, key, tensors)
            if e is None or len(e.rows) == 0:
                continue
            rows = pa.array(e.rows.numpy())
            columns = {
                "sample": sample[e.rows].numpy(), "patient_id": pid.take(rows), "visit_id": vid.take(rows),
                "feature": pa.array([key] * len(e.rows), pa.string()),
                "visit": e.visit.int().numpy(), "position": e.position.int().numpy(),
                "code_id": e.codes.numpy(), "code": names.take(key, e.codes), "attribution": e.values.numpy(),
                "probability": prob[e.rows].numpy(), "target": target[e.rows].numpy()}
            columns.update({m: v[sample[e.rows]].numpy() for m, v in (scores or {}).items()})
            parts.append(pa.table(columns))
        if parts:
            yield _concat(parts)


def _concat(parts: list[Any]):
    pa = _need("pyarrow")
    dtypes = {p.schema.field("attribution").type for p in parts}
    if len(dtypes) > 1:  # features stored in different float dtypes: widen to float64
        parts = [p.set_column(p.schema.get_field_index("attribution"), "attribution",
                              p["attribution"].cast(pa.float64())) for p in parts]
    return pa.concat_tables(parts)


def to_dataframe(store: Attributions, features: Sequence[str] | None = None):
    """The whole long table as a pandas DataFrame in sample order (rows of one sample in feature,
    visit and position order); ids, features and codes as categoricals."""
    pa = _need("pyarrow")
    _need("pandas")
    parts = list(tables(store, features))
    if not parts:
        return _empty_schema().empty_table().to_pandas()
    table = pa.concat_tables(parts, promote_options="permissive") if len(parts) > 1 else parts[0]
    for name in ("patient_id", "visit_id", "feature", "code"):
        table = table.set_column(table.schema.get_field_index(name), name, table[name].dictionary_encode())
    frame = table.to_pandas()
    return frame.sort_values("sample", kind="stable", ignore_index=True)


def _empty_schema():
    pa = _need("pyarrow")
    return pa.schema([("sample", pa.int64()), ("patient_id", pa.string()), ("visit_id", pa.string()),
                      ("feature", pa.string()), ("visit", pa.int32()), ("position", pa.int32()),
                      ("code_id", pa.int64()), ("code", pa.string()), ("attribution", pa.float32()),
                      ("probability", pa.float32()), ("target", pa.int64())])


def _writer(format: str, path: Path, schema: Any):
    if format == "parquet":
        return _need("pyarrow.parquet").ParquetWriter(path, schema, compression="zstd")
    return _need("pyarrow.csv").CSVWriter(path, schema)


def export(store: Attributions, path: str | Path, format: str | None = None, *,
           features: Sequence[str] | None = None, row_group_rows: int = ROW_GROUP_ROWS,
           progress: bool | None = None) -> Path:
    """Stream the long table to ``path`` as parquet (pyarrow, row groups of ``row_group_rows``
    rows written as the shards are read: memory stays flat however large the run) or CSV.
    ``format`` defaults to the file suffix. Rows come in batch order (sample order unless the run
    was length-sorted; sort on ``sample`` if needed). Written to a temporary name, then renamed."""
    path = Path(path)
    format = format or path.suffix.lstrip(".").lower()
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS} (or the file name end in .parquet / .csv); got {format!r}")
    check_count("row_group_rows", row_group_rows)
    pa = _need("pyarrow")
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer, pending, rows = None, [], 0
    try:
        for table in tables(store, features, progress=progress):
            if writer is None:
                writer = _writer(format, tmp, table.schema)
            if format == "csv":
                writer.write_table(table)
                continue
            pending.append(table)
            rows += table.num_rows
            if rows >= row_group_rows:
                whole = pa.concat_tables(pending)
                writer.write_table(whole.slice(0, rows - rows % row_group_rows), row_group_size=row_group_rows)
                pending, rows = [whole.slice(rows - rows % row_group_rows)], rows % row_group_rows
        if writer is None:  # a run with no rows: an empty file with the schema
            writer = _writer(format, tmp, _empty_schema())
        if format == "parquet" and rows:
            writer.write_table(pa.concat_tables(pending), row_group_size=row_group_rows)
        writer.close()
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# -- one-pass summaries ---------------------------------------------------------------------------

def _per_sample_codes(e: _Entries) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (sample row, code) present: the row, the code, the sample's attribution to the code
    (summed over its positions, float64) and how many positions hold it; sorted by row, code."""
    width = int(e.codes.max()) + 1
    uniq, inverse = torch.unique(e.rows * width + e.codes, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, e.values.double())
    occurrences = torch.bincount(inverse, minlength=len(uniq)).double()
    return uniq // width, uniq % width, sums, occurrences


def sample_values(store: Attributions, wanted: Sequence[tuple[str, int]], limit: int = 5000, *,
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
FAITHFULNESS = ("comprehensiveness", "sufficiency")
# with stored faithfulness scores: per code, the scored samples carrying it and the sums of their scores
SCORED_STATS = ("scored", *FAITHFULNESS)


@dataclass
class CodeSummary:
    """Per (feature, code, class) sums from one pass over a run; :meth:`table` turns them into
    statistics. ``class_totals[c]``: samples of class ``c``. With ``per_sample`` (what reports
    use): per sample position, its top (feature index, code) (-1 when it has no entry), summary
    class and probability of the explained class."""

    store: Attributions
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


def summarize_codes(store: Attributions, features: Sequence[str] | None = None, *,
                    per_sample: bool = False, progress: bool | None = False) -> CodeSummary:
    """One streaming pass over the shards (memory independent of the cohort's size, apart from
    four numbers per sample with ``per_sample``), in batch order, in float64: a run made by one
    process and the same run made under torchrun give identical sums."""
    require_info(store)
    keys = _features(store, features)
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
        prob, _, cls, shard_rule = _classes(tensors, size)
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
            for (f, g_rows, g_codes, _), start, stop in zip(groups, starts[:-1], starts[1:]):
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


def summarize(store: Attributions, by_class: bool = False, features: Sequence[str] | None = None, *,
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
    pd = _need("pandas")
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
