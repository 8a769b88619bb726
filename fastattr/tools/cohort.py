"""Cohort-scale attribution: every batch of a dataloader, streamed to disk as checksummed shards,
resumable after any interruption, and shardable across processes with torch.distributed.

Storage: one safetensors file per batch. safetensors keeps each attribution's dtype and shape
exactly (no flattening into table columns), is read lazily through a memory map, and is a small
dependency; the patient/visit ids of a shard go in its header metadata, so an id index is built
from headers alone. A JSON manifest lists every finished shard with its SHA-256, its batch index
and its ids; a shard exists for readers only once the manifest names it, and both are written to
a temporary name and renamed, so a killed process leaves either the old state or the new one.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fastattr.core.targets import resolve_targets
from fastattr.interpret.features import batch_size, select_samples

FORMAT = "fastattr-attributions/1"
ID_KEYS = ("patient_id", "visit_id")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _ids(batch: dict[str, Any], size: int, index: int) -> dict[str, list[str]]:
    ids = {k: [str(v) for v in batch[k]] for k in ID_KEYS if isinstance(batch.get(k), (list, tuple))}
    if "patient_id" not in ids:
        ids["patient_id"] = [f"batch{index}:{i}" for i in range(size)]
    return ids


def _attribute_with_retry(interpreter: Any, batch: dict[str, Any], index: int, kwargs: dict[str, Any]):
    """Attribute ``batch``; on CUDA out-of-memory, retry in halves down to one patient."""
    size = batch_size(batch)
    try:
        return [(0, size, interpreter.attribute(**kwargs, **batch))]
    except torch.cuda.OutOfMemoryError as exc:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if size == 1:
            raise RuntimeError(f"batch {index} ran out of memory even one patient at a time") from exc
    half = (size + 1) // 2
    parts = []
    for start, stop in ((0, half), (half, size)):
        sub = _attribute_with_retry(interpreter, select_samples(batch, start, stop), index, kwargs)
        parts += [(start + a, start + b, r) for a, b, r in sub]
    return parts


def _concat(parts: list[tuple[int, int, Any]]) -> Any:
    if len(parts) == 1:
        return parts[0][2]
    first = parts[0][2]
    if isinstance(first, tuple):  # (attributions, convergence delta)
        return ({k: torch.cat([p[2][0][k] for p in parts]) for k in first[0]}, torch.cat([p[2][1] for p in parts]))
    return {k: torch.cat([p[2][k] for p in parts]) for k in first}


def _predictions(model: Any, batch: dict[str, Any], target: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted probabilities ``[B, C]`` and the class each patient is explained for."""
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k in model.feature_keys})
    logits = out["logit"].reshape(out["logit"].shape[0], -1)
    prob = out["y_prob"] if "y_prob" in out else logits
    targets = resolve_targets(target, logits, logits.shape[0], logits.shape[1], logits.device)
    return prob.detach().float().reshape(prob.shape[0], -1), targets


def _distributed() -> tuple[int, int, bool]:
    """(rank, world size, whether this call started the process group, as it does under torchrun)."""
    import torch.distributed as dist

    if not dist.is_available():
        return 0, 1, False
    started = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        started = True
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), started
    return 0, 1, started


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _read_manifest(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fastattr attribution manifest (format {manifest.get('format')!r})")
    return manifest


def _verified(out: Path, shards: dict[str, dict], repair: bool) -> dict[str, dict]:
    """Shards whose file matches its checksum; with ``repair`` the others are dropped to be redone,
    without it a mismatch is an error."""
    good = {}
    for name, entry in shards.items():
        path = out / entry["file"]
        ok = path.exists() and _sha256(path) == entry["sha256"]
        if ok:
            good[name] = entry
        elif repair:
            warnings.warn(f"shard {entry['file']} is missing or corrupt (checksum mismatch); batch "
                          f"{entry['batch']} will be attributed again", stacklevel=3)
        else:
            raise ValueError(f"shard {path} is missing, truncated or corrupt: its SHA-256 does not match the manifest")
    return good


def attribute_dataset(interpreter: Any, dataloader: Iterable[dict[str, Any]], out: str | Path, *,
                      save_probabilities: bool = True, resume: bool = True, progress: bool | None = None,
                      **attribute_kwargs: Any) -> Path:
    """Attribute every batch of ``dataloader`` with ``interpreter`` and stream the results to ``out``.

    Args:
        interpreter: a fastattr interpreter (``IntegratedGradients``, ``CheferRelevance``) or any
            object with ``attribute(**kwargs, **batch)`` and ``model``.
        dataloader: batches as dicts (a PyHealth dataloader, or ``fastattr.tools.cohort.CohortDataset``
            through a ``DataLoader``). Its order must be the same on every run and rank
            (``shuffle=False``); ids come from ``patient_id`` / ``visit_id`` when present.
        out: a folder; created if needed.
        save_probabilities: also store the model's predicted probabilities and the class each
            patient was explained for (``target``), from one extra forward per batch.
        resume: continue a run found in ``out`` (verifying its shards by checksum and redoing any
            corrupt one); ``False`` refuses to touch a folder that already holds a run.
        progress: progress bar with patients/s and ETA (``None``: only on a terminal).
        **attribute_kwargs: passed to ``interpreter.attribute`` (``steps``, ``target_class_idx``,
            ``return_convergence_delta``...). With ``return_convergence_delta`` the delta is stored.

    Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is started (NCCL on GPUs, gloo on
    CPUs) and rank r takes batches r, r + W, ...: the same batches as a single process, so the
    results are identical; every rank writes its own shards and rank 0 merges the manifest.
    A batch that runs out of CUDA memory is retried in halves before failing.
    """
    out = Path(out)
    rank, world, started = _distributed()
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    rank_path = out / f"manifest.rank{rank}.json"
    existing = _read_manifest(manifest_path)
    if existing is not None and not resume:
        raise FileExistsError(f"{out} already holds an attribution run; pass resume=True to continue it")
    shards: dict[str, dict] = dict(existing["shards"]) if existing else {}
    for leftover in out.glob("manifest.rank*.json"):  # ranks of an interrupted distributed run
        part = _read_manifest(leftover)
        if part:
            shards.update(part["shards"])
    shards = _verified(out, shards, repair=True)
    _barrier()  # every rank has read the previous state before any rank writes
    done = {entry["batch"]: entry for entry in shards.values()}
    mine = {name: entry for name, entry in shards.items() if entry["batch"] % world == rank}
    model = getattr(interpreter, "model", None)
    try:
        total_patients = len(dataloader.dataset)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        total_patients = None
    bar = tqdm(total=total_patients, unit="patient", desc=f"attributing (rank {rank}/{world})" if world > 1 else
               "attributing", disable=None if progress is None else not progress, smoothing=0.1)

    def save_rank_manifest() -> None:
        _write_atomic(rank_path, json.dumps({"format": FORMAT, "shards": mine}).encode())

    for index, batch in enumerate(dataloader):
        size = batch_size(batch)
        ids = _ids(batch, size, index)
        if index in done:
            if done[index]["ids"] != ids:
                raise ValueError(f"batch {index} holds other patients than in the interrupted run; the "
                                 "dataloader must keep its order (shuffle=False) to resume")
            bar.update(size)
            continue
        if index % world != rank:
            bar.update(size)
            continue
        result = _concat(_attribute_with_retry(interpreter, batch, index, attribute_kwargs))
        attributions, delta = result if isinstance(result, tuple) else (result, None)
        tensors = {f"attr/{k}": v.detach().contiguous().cpu() for k, v in attributions.items()}
        if delta is not None:
            tensors["convergence_delta"] = delta.detach().contiguous().cpu()
        if save_probabilities and model is not None:
            prob, targets = _predictions(model, batch, attribute_kwargs.get("target_class_idx"))
            tensors["probability"] = prob.cpu().contiguous()
            tensors["target"] = targets.cpu().contiguous()
        from safetensors.torch import save

        name = f"shard-{index:08d}.safetensors"
        _write_atomic(out / name, save(tensors, metadata={"ids": json.dumps(ids), "batch": str(index)}))
        mine[name] = {"file": name, "batch": index, "patients": size, "ids": ids, "sha256": _sha256(out / name)}
        save_rank_manifest()
        bar.update(size)
    bar.close()
    save_rank_manifest()
    _barrier()
    if rank == 0:
        merged = dict(shards)
        for part_path in sorted(out.glob("manifest.rank*.json")):
            merged.update(_read_manifest(part_path)["shards"])
        merged = dict(sorted(merged.items(), key=lambda item: item[1]["batch"]))
        _write_atomic(manifest_path, json.dumps({"format": FORMAT, "complete": True,
                                                 "patients": sum(e["patients"] for e in merged.values()),
                                                 "shards": merged}, indent=1).encode())
        for part_path in out.glob("manifest.rank*.json"):
            part_path.unlink()
        for stray in out.glob("shard-*.safetensors*"):  # written by a killed run, never listed
            if stray.name not in merged:
                stray.unlink()
    _barrier()
    if started:
        torch.distributed.destroy_process_group()
    return out


@dataclass
class _Location:
    shard: str
    row: int


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
        manifest = _read_manifest(self.out / "manifest.json")
        if manifest is None:
            raise FileNotFoundError(f"{self.out} holds no manifest.json: not a finished attribution run")
        self.complete = bool(manifest.get("complete"))
        self.shards = dict(sorted(manifest["shards"].items(), key=lambda item: item[1]["batch"]))
        self._checked: set[str] = set()
        self._rows: list[_Location] = []
        self.patient_ids: list[str] = []
        self.visit_ids: list[str | None] = []
        for name, entry in self.shards.items():
            ids = entry["ids"]
            self._rows += [_Location(name, row) for row in range(entry["patients"])]
            self.patient_ids += ids["patient_id"]
            self.visit_ids += ids.get("visit_id", [None] * entry["patients"])
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
        from safetensors import safe_open

        if name not in self._checked:
            _verified(self.out, {name: self.shards[name]}, repair=False)
            self._checked.add(name)
        return safe_open(self.out / name, framework="pt")

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        if position not in self:
            hint = " (keys are sample positions; look ids up with store.lookup(patient_id))" \
                if isinstance(position, str) else ""
            raise KeyError(f"no sample at position {position!r} in {self.out}: {len(self)} samples{hint}")
        loc = self._rows[position]
        with self._open(loc.shard) as f:
            return {k: f.get_slice(k)[loc.row: loc.row + 1][0] for k in f.keys()}

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Each shard's tensors, in batch order."""
        for name in self.shards:
            with self._open(name) as f:
                yield {k: f.get_tensor(k) for k in f.keys()}

    def all(self) -> dict[str, torch.Tensor]:
        """Every shard concatenated (same-width attributions; padded widths must match)."""
        parts = list(self.batches())
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}


def load_attributions(out: str | Path) -> Attributions:
    """Open an attribution run written by :func:`attribute_dataset` for lazy reading."""
    return Attributions(out)


class CohortDataset(torch.utils.data.Dataset):
    """A :class:`fastattr.tools.synthetic.SyntheticCohort` as a map-style dataset of patient dicts."""

    def __init__(self, cohort: Any) -> None:
        self.cohort = cohort

    def __len__(self) -> int:
        return len(self.cohort)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.cohort.batch([index])
        return {"patient_id": f"P{index:08d}", "codes": row["codes"][0], "label": row["label"][0]}
