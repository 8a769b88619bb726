"""From an opened run's attribution shards to tables: decoded long rows, parquet/CSV export, and
per-code cohort statistics computed in one streaming pass. The functions take a run opened by
:func:`fastattr.runs.reader.load_attributions` (:mod:`fastattr.runs.tables` takes folders too).

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

import torch
from tqdm.auto import tqdm

from fastattr.core.checks import check_count


class OpenedRun(Protocol):
    """What the table and summary functions read of an opened run: the interface of
    :class:`fastattr.runs.reader.Attributions` they use (a protocol, so that the reader can offer
    them as methods without an import cycle)."""

    out: Path
    info: dict[str, Any] | None
    shards: dict[str, dict]

    def __len__(self) -> int: ...

    def shards_with_positions(self) -> Iterator[tuple[list[int], dict[str, list], dict[str, torch.Tensor]]]: ...

    def scores(self) -> Any: ...

FORMATS = ("parquet", "csv")
FAITHFULNESS = ("comprehensiveness", "sufficiency")
ROW_GROUP_ROWS = 1 << 18


def need_extra(module: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:
        raise ImportError(f"fastattr tables and reports need {module.split('.')[0]}: "
                          f"pip install \"fastattr[report]\"") from exc


def require_info(store: OpenedRun) -> OpenedRun:
    """``store``, checked to carry the ``run.json`` that tables need."""
    if store.info is None:
        raise ValueError(f"{store.out} has no run.json: it was written by a fastattr before runs stored their "
                         "vocabulary and token ids; attribute it again to get tables and reports")
    return store


def chosen_features(store: OpenedRun, features: Sequence[str] | None) -> list[str]:
    known = list(store.info["features"])
    if features is None:
        return known
    unknown = [k for k in features if k not in known]
    if unknown:
        raise ValueError(f"features {unknown} are not in the run {store.out}; it has {known}")
    return list(features)


def code_names(store: OpenedRun, key: str, count: int) -> list[str]:
    """Names of ids ``0 .. count - 1`` of feature ``key``: the run's vocabulary, the id as text
    where the vocabulary has no name; a continuous feature's channels ``key[c]`` unless named."""
    feature = store.info["features"][key]
    vocab = feature.get("vocab") or []
    default = (lambda i: str(i)) if feature["token"] else (lambda i: f"{key}[{i}]")
    return [vocab[i] if i < len(vocab) and vocab[i] is not None else default(i) for i in range(count)]


def has_vocab(store: OpenedRun, key: str) -> bool:
    return bool(store.info["features"][key].get("vocab"))


TARGET_RULE = "explained class (target)"
PREDICTED_RULE = "predicted label (probability >= 0.5; a single-output model explains its positive logit)"


def sample_classes(tensors: dict[str, torch.Tensor], size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
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
class Entries:
    """One feature of one shard, padding left out: per kept entry its row in the shard, visit,
    position, code id and attribution."""

    rows: torch.Tensor
    visit: torch.Tensor
    position: torch.Tensor
    codes: torch.Tensor
    values: torch.Tensor


def entries(store: OpenedRun, key: str, tensors: dict[str, torch.Tensor]) -> Entries | None:
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
    return Entries(index[:, 0], visit, position, codes, values)


class _Names:
    """Decoded code names per feature as Arrow string arrays, extended as larger ids appear."""

    def __init__(self, store: OpenedRun) -> None:
        self.store, self.arrays = store, {}

    def take(self, key: str, codes: torch.Tensor):
        pa = need_extra("pyarrow")
        need = int(codes.max()) + 1 if len(codes) else 0
        if key not in self.arrays or len(self.arrays[key]) < need:
            size = max(need, len(self.store.info["features"][key].get("vocab") or []))
            self.arrays[key] = pa.array(code_names(self.store, key, size), pa.string())
        return self.arrays[key].take(pa.array(codes.numpy()))


def sample_scores(store: OpenedRun) -> dict[str, torch.Tensor] | None:
    """Per sample position, the faithfulness scores ``fastattr evaluate`` stored for the run:
    ``comprehensiveness`` and ``sufficiency`` (NaN where the patient was not scored); ``None``
    when the run was not scored."""
    scores = store.scores()
    if scores is None:
        return None
    rows = scores.all()
    return {m: torch.where(rows["valid"], rows[m], torch.tensor(float("nan"))) for m in FAITHFULNESS}


def tables(store: OpenedRun, features: Sequence[str] | None = None, *,
           progress: bool | None = False) -> Iterator[Any]:
    """The run's long table (module docstring), one ``pyarrow.Table`` per shard, in batch order."""
    pa = need_extra("pyarrow")
    require_info(store)
    keys = chosen_features(store, features)
    names = _Names(store)
    scores = sample_scores(store)
    for positions, ids, tensors in tqdm(store.shards_with_positions(), total=len(store.shards), unit="shard",
                                        desc="reading shards", disable=None if progress is None else not progress):
        size = len(positions)
        prob, target, _, _ = sample_classes(tensors, size)
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
    pa = need_extra("pyarrow")
    dtypes = {p.schema.field("attribution").type for p in parts}
    if len(dtypes) > 1:  # features stored in different float dtypes: widen to float64
        parts = [p.set_column(p.schema.get_field_index("attribution"), "attribution",
                              p["attribution"].cast(pa.float64())) for p in parts]
    return pa.concat_tables(parts)


def to_dataframe(store: OpenedRun, features: Sequence[str] | None = None):
    """The whole long table as a pandas DataFrame in sample order (rows of one sample in feature,
    visit and position order); ids, features and codes as categoricals."""
    pa = need_extra("pyarrow")
    need_extra("pandas")
    parts = list(tables(store, features))
    if not parts:
        return _empty_schema().empty_table().to_pandas()
    table = pa.concat_tables(parts, promote_options="permissive") if len(parts) > 1 else parts[0]
    for name in ("patient_id", "visit_id", "feature", "code"):
        table = table.set_column(table.schema.get_field_index(name), name, table[name].dictionary_encode())
    frame = table.to_pandas()
    return frame.sort_values("sample", kind="stable", ignore_index=True)


def _empty_schema():
    pa = need_extra("pyarrow")
    return pa.schema([("sample", pa.int64()), ("patient_id", pa.string()), ("visit_id", pa.string()),
                      ("feature", pa.string()), ("visit", pa.int32()), ("position", pa.int32()),
                      ("code_id", pa.int64()), ("code", pa.string()), ("attribution", pa.float32()),
                      ("probability", pa.float32()), ("target", pa.int64())])


def _writer(format: str, path: Path, schema: Any):
    if format == "parquet":
        return need_extra("pyarrow.parquet").ParquetWriter(path, schema, compression="zstd")
    return need_extra("pyarrow.csv").CSVWriter(path, schema)


def export(store: OpenedRun, path: str | Path, format: str | None = None, *,
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
    pa = need_extra("pyarrow")
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
