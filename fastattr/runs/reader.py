"""Reading a run folder: :class:`Attributions`, a lazy read-only mapping from each sample's position
to its tensors, every shard checked against the manifest's SHA-256 when first opened."""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

import fastattr.runs.frames as frames
import fastattr.runs.summaries as summaries
from fastattr.runs.files import SHAPE_PREFIX, read_manifest, read_run_info, verified


@dataclass
class _Location:
    shard: str
    row: int


# Where fastattr evaluate keeps a run's faithfulness scores: a run folder of their own inside the run.
SCORES_FOLDER = "faithfulness"


class Attributions(Mapping[int, dict[str, torch.Tensor]]):
    """Attributions stored by :func:`attribute_dataset`, read lazily: a read-only mapping from each
    sample's position in the dataset (0, 1, ... in dataloader order, always unique) to its
    ``{"attr/<key>": tensor, "probability": ..., "target": ...}``.

    Ids are columns, not keys, because they need not be unique (several samples of one visit, a
    dataset without visit ids): ``store.patient_ids`` and ``store.visit_ids`` list them by
    position, ``store.find(patient_id, visit_id=None)`` gives the positions of every matching
    sample and ``store.lookup(...)`` their rows. ``store.all()`` concatenates everything in order.
    A shard is checked against the manifest's SHA-256 the first time it is opened.
    """

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        if not self.out.is_dir():
            raise FileNotFoundError(f"{self.out} is not a folder: give the output folder of a fastattr attribution run")
        manifest = read_manifest(self.out / "manifest.json")
        if manifest is None:
            unfinished = any(self.out.glob("manifest.rank*.json*"))
            raise FileNotFoundError(
                f"{self.out} is not a fastattr attribution run: it holds no manifest.json"
                + (" (only the rank manifests of an unfinished run: run the same attribution again to resume and "
                   "finish it)" if unfinished else " (write one with fastattr attribute or attribute_dataset)"))
        self.complete = bool(manifest.get("complete"))
        #: ``run.json``: method, model, per-feature token-ness and vocabulary, annotations (``None``
        #: for a run written before fastattr stored it).
        self.info: dict[str, Any] | None = read_run_info(self.out)
        self.shards = dict(sorted(manifest["shards"].items(), key=lambda item: item[1]["batch"]))
        self._checked: set[str] = set()
        located: dict[int, tuple[_Location, str, str | None]] = {}
        count = 0
        for name, entry in self.shards.items():
            ids = entry["ids"]
            visits = ids.get("visit_id", [None] * entry["patients"])
            positions = entry.get("positions") or list(range(count, count + entry["patients"]))
            for row, position in enumerate(positions):
                located[position] = (_Location(name, row), ids["patient_id"][row], visits[row])
            count += entry["patients"]
        if sorted(located) != list(range(len(located))):
            raise ValueError(f"{self.out}/manifest.json does not give every sample one position 0..{len(located) - 1}")
        ordered = [located[i] for i in range(len(located))]
        self._rows = [loc for loc, _, _ in ordered]
        self.patient_ids: list[str] = [pid for _, pid, _ in ordered]
        self.visit_ids: list[str | None] = [vid for _, _, vid in ordered]
        self._by_id: dict[str, list[int]] = {}
        for position, pid in enumerate(self.patient_ids):
            self._by_id.setdefault(pid, []).append(position)

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self._rows)))

    def __contains__(self, position: object) -> bool:
        return isinstance(position, int) and not isinstance(position, bool) and 0 <= position < len(self._rows)

    def find(self, patient_id: Any, visit_id: Any = None) -> list[int]:
        """Positions of every sample of ``patient_id`` (and ``visit_id`` when given), in order."""
        found = self._by_id.get(str(patient_id), [])
        if visit_id is not None:
            found = [i for i in found if self.visit_ids[i] == str(visit_id)]
        return list(found)

    def lookup(self, patient_id: Any, visit_id: Any = None) -> list[dict[str, torch.Tensor]]:
        """The rows of every sample of ``patient_id`` (and ``visit_id``); KeyError when none."""
        found = self.find(patient_id, visit_id)
        if not found:
            which = f"patient {patient_id!r}" + (f", visit {visit_id!r}" if visit_id is not None else "")
            raise KeyError(f"no sample of {which} in {self.out}")
        return [self[i] for i in found]

    def _open(self, name: str):
        if name not in self._checked:
            verified(self.out, {name: self.shards[name]}, repair=False)
            self._checked.add(name)
        return safe_open(self.out / name, framework="pt")

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        if position not in self:
            hint = " (keys are sample positions; look ids up with store.lookup(patient_id))" \
                if isinstance(position, str) else ""
            raise KeyError(f"no sample at position {position!r} in {self.out}: {len(self)} samples{hint}")
        loc = self._rows[position]
        with self._open(loc.shard) as f:
            names = list(f.keys())
            row = {}
            for name in (n for n in names if not n.startswith(SHAPE_PREFIX)):
                cut: tuple[slice, ...] = ()
                if SHAPE_PREFIX + name in names:  # the sample's own shape (runs written before it: as stored)
                    cut = tuple(slice(0, int(n)) for n in f.get_slice(SHAPE_PREFIX + name)[loc.row])
                row[name] = f.get_slice(name)[(slice(loc.row, loc.row + 1), *cut)][0]
            return row

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Each shard's tensors, in batch order, padded to the shard's widest sample."""
        for _, _, tensors in self.shards_with_positions():
            yield tensors

    def shards_with_positions(self, row_shapes: bool = False
                              ) -> Iterator[tuple[list[int], dict[str, list], dict[str, torch.Tensor]]]:
        """Per shard, in batch order: its samples' dataset positions, their ids
        (``{"patient_id": [...], "visit_id": [...]}``, as the manifest lists them) and its tensors
        (with ``row_shapes``, also each row's own shape, ``shape/<name>``, where the run stored it)."""
        row = 0
        for name, entry in self.shards.items():
            positions = entry.get("positions") or list(range(row, row + entry["patients"]))
            row += entry["patients"]
            with self._open(name) as f:
                yield positions, entry["ids"], {k: f.get_tensor(k) for k in f.keys()
                                                if row_shapes or not k.startswith(SHAPE_PREFIX)}

    def scores(self) -> Attributions | None:
        """The faithfulness scores ``fastattr evaluate`` stored for this run (``RUN/faithfulness``,
        see :mod:`fastattr.report.scores`), opened like a run, or ``None``."""
        folder = self.out / SCORES_FOLDER
        return Attributions(folder) if (folder / "manifest.json").exists() else None

    def to_dataframe(self, features: list[str] | None = None):
        """The run as one long pandas table: a row per (sample, feature, visit, position) that is
        not padding, with ids, decoded code, attribution, probability and explained class, in
        sample order (see :mod:`fastattr.runs.frames`; needs the ``report`` extra)."""
        return frames.to_dataframe(self, features=features)

    def export(self, path: str | Path, format: str | None = None, **kwargs: Any) -> Path:
        """Stream the long table to a parquet or CSV file (see :func:`fastattr.runs.frames.export`)."""
        return frames.export(self, path, format=format, **kwargs)

    def summarize(self, by_class: bool = False, features: list[str] | None = None):
        """Per-code cohort statistics in one pass (see :func:`fastattr.runs.summaries.summarize`)."""
        return summaries.summarize(self, by_class=by_class, features=features)

    def all(self) -> dict[str, torch.Tensor]:
        """Every sample's tensors stacked in position order; shards padded to different widths
        (length-sorted runs) are zero-padded to the widest, as a dataloader pads a batch."""
        parts, order, row = [], torch.zeros(len(self), dtype=torch.long), 0
        for positions, _, tensors in self.shards_with_positions():
            parts.append(tensors)
            order[torch.tensor(positions)] = torch.arange(row, row + len(positions))
            row += len(positions)
        if not parts:
            return {}
        out = {}
        for key in parts[0]:
            tensors = [p[key] for p in parts]
            widest = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
            padded = [torch.nn.functional.pad(t, [x for d in reversed(range(1, t.dim()))
                                                  for x in (0, widest[d - 1] - t.shape[d])]) for t in tensors]
            out[key] = torch.cat(padded).index_select(0, order)
        return out


def load_attributions(out: str | Path) -> Attributions:
    """Open an attribution run written by :func:`attribute_dataset` for lazy reading."""
    return Attributions(out)


def open_run(run: str | Path | Attributions) -> Attributions:
    """``run`` opened with :func:`load_attributions` (an ``Attributions`` is used as it is)."""
    return run if isinstance(run, Attributions) else load_attributions(run)
