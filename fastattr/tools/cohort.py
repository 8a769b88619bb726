"""Cohort-scale attribution: every batch of a dataloader, streamed to disk as checksummed shards,
resumable after any interruption, and shardable across processes with torch.distributed.

Storage: one safetensors file per batch. safetensors keeps each attribution's dtype and shape
exactly (no flattening into table columns), is read lazily through a memory map, and is a small
dependency; the patient/visit ids of a shard go in its header metadata, so an id index is built
from headers alone. A JSON manifest lists every finished shard with its SHA-256, its batch index
and its ids; a shard exists only once it is listed. Shards are written to a temporary name and
renamed; while a run goes, each rank appends one fsynced line per shard to its journal (a line cut
short by a kill is ignored and its shard redone), and at the end rank 0 merges the journals into
the manifest (written to a temporary name and renamed). So a killed process leaves either the old
state or the new one, and listing a shard costs the same at the end of a long run as at its start.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save
from tqdm.auto import tqdm

from fastattr.core.targets import resolve_targets
from fastattr.interpret.features import FeatureBatch, FeatureLayout, batch_size, select_samples

FORMAT = "fastattr-attributions/1"
RUN_FORMAT = "fastattr-run/1"
RUN_INFO = "run.json"
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
    """Attribute ``batch``; on CUDA out-of-memory, retry in halves down to one patient. Returns
    ``[(start, stop, result, predictions or None), ...]``; the predictions are the interpreter's
    own (``last_predictions``), so the model runs no extra forward for them."""
    size = batch_size(batch)
    try:
        result = interpreter.attribute(**kwargs, **batch)
        return [(0, size, result, getattr(interpreter, "last_predictions", None))]
    except torch.cuda.OutOfMemoryError as exc:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if size == 1:
            raise RuntimeError(f"batch {index} ran out of memory even one patient at a time") from exc
    half = (size + 1) // 2
    parts = []
    for start, stop in ((0, half), (half, size)):
        sub = _attribute_with_retry(interpreter, select_samples(batch, start, stop), index, kwargs)
        parts += [(start + a, start + b, r, p) for a, b, r, p in sub]
    return parts


def _concat(parts: list[tuple]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, Any]:
    """``(attributions, convergence delta or None, (probabilities, targets) or None)`` of the parts."""
    results = [p[2] for p in parts]
    pairs = [r if isinstance(r, tuple) else (r, None) for r in results]
    attributions = {k: torch.cat([a[k] for a, _ in pairs]) for k in pairs[0][0]}
    delta = torch.cat([d for _, d in pairs]) if pairs[0][1] is not None else None
    preds = [p[3] for p in parts]
    predictions = None if any(p is None for p in preds) else \
        (torch.cat([p[0] for p in preds]), torch.cat([p[1] for p in preds]))
    return attributions, delta, predictions


def _inputs(model: Any, batch: dict[str, Any], attributions: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a table needs beside each attribution: the token ids (``input/<key>``, token features)
    and a bool tensor of the attribution's shape that is ``False`` at padding (``keep/<key>``)."""
    features = FeatureBatch.from_batch(model, batch)
    out = {}
    for key, attr in attributions.items():
        if key not in features.keys:
            continue
        if features.layouts[key].token and features.value(key).shape == attr.shape:
            out[f"input/{key}"] = features.value(key).detach().cpu().contiguous()
        try:
            out[f"keep/{key}"] = features.keep(key, attr.shape)
        except RuntimeError:  # a result that does not broadcast with the mask: every entry is kept
            pass
    return out


def _predictions(model: Any, batch: dict[str, Any], target: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted probabilities ``[B, C]`` and the class each patient is explained for, for an
    interpreter that does not report its own (one extra forward)."""
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k in model.feature_keys})
    logits = out["logit"].reshape(out["logit"].shape[0], -1)
    prob = out["y_prob"] if "y_prob" in out else logits
    targets = resolve_targets(target, logits, logits.shape[0], logits.shape[1], logits.device)
    return prob.detach().float().reshape(prob.shape[0], -1), targets


def _distributed() -> tuple[int, int, bool]:
    """(rank, world size, whether this call started the process group, as it does under torchrun)."""
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


def _names(key: str, vocab: Any) -> list[str | None]:
    """A vocabulary as names by id: a ``{code: id}`` mapping (PyHealth's ``code_vocab``) inverted,
    or a sequence of names already indexed by id."""
    if isinstance(vocab, Mapping):
        ids = list(vocab.values())
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ValueError(f"vocab[{key!r}] must map codes to integer ids >= 0")
        names: list[str | None] = [None] * (max(ids, default=-1) + 1)
        for code, i in vocab.items():
            names[i] = str(code)
        return names
    if isinstance(vocab, (list, tuple)):
        return [None if n is None else str(n) for n in vocab]
    raise TypeError(f"vocab[{key!r}] must be a {{code: id}} mapping or a list of names by id; got {type(vocab).__name__}")


def _json_safe(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)


def run_info(interpreter: Any, model: Any, vocab: Mapping[str, Any] | None = None,
             annotations: Mapping[str, Mapping[str, str]] | None = None,
             attribute_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a run folder says about itself (``run.json``): the method, the model, and per feature
    whether it is a token feature and its vocabulary (names by id: ``vocab[key]`` when given,
    else the processor's ``code_vocab`` inverted, else ``None``: codes are then shown as ids),
    plus ``annotations`` (``{feature: {code name: label}}``, e.g. planted codes) for reports."""
    vocab = dict(vocab or {})
    features = {}
    for key in getattr(model, "feature_keys", []):
        processor = model.dataset.input_processors[key]
        given = vocab.pop(key, None)
        if given is None:
            given = getattr(processor, "code_vocab", None)
        features[key] = {"token": bool(processor.is_token()), "vocab": None if given is None else _names(key, given)}
    if vocab:
        raise ValueError(f"vocab names features the model does not have: {sorted(vocab)}; its features are "
                         f"{list(features)}")
    for key, marks in (annotations or {}).items():
        if key not in features or not isinstance(marks, Mapping):
            raise ValueError(f"annotations[{key!r}] must be a {{code name: label}} mapping for one of the model's "
                             f"features {list(features)}")
    return {"format": RUN_FORMAT, "method": type(interpreter).__name__, "model": type(model).__name__,
            "features": features,
            "annotations": {k: {str(c): str(v) for c, v in m.items()} for k, m in (annotations or {}).items()},
            "options": {k: _json_safe(v) for k, v in (attribute_kwargs or {}).items()}}


def _write_run_info(out: Path, info: dict[str, Any], resume: bool) -> None:
    """Write ``run.json``, or check a resumed run was made with the same features and vocabulary."""
    path = out / RUN_INFO
    if path.exists() and resume:
        old = json.loads(path.read_text())
        known = {"IntegratedGradients", "CheferRelevance"}  # a wrapper of one (a test's counter) is not another method
        parts = ("method", "features") if {old.get("method"), info["method"]} <= known else ("features",)
        for part in parts:
            if old.get(part) != info[part]:
                what = "method" if part == "method" else "features or vocabulary"
                raise ValueError(f"{out} holds a run whose {what} differs from this call's ({RUN_INFO}); resume it "
                                 "with the same interpreter, model and vocab, or use another folder")
    _write_atomic(path, json.dumps(info, indent=1).encode())


def _read_journal(path: Path) -> dict[str, dict]:
    """A rank's journal: a format line, then one JSON line per finished shard. A line cut short by
    a killed process (no newline, or not JSON) is skipped: its shard is redone."""
    entries: dict[str, dict] = {}
    lines = path.read_bytes().split(b"\n")
    for number, line in enumerate(lines[:-1]):  # the part after the last newline is a torn write
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if number == 0:
            if entry.get("format") != FORMAT:
                raise ValueError(f"{path} is not a fastattr attribution journal (format {entry.get('format')!r})")
        elif isinstance(entry, dict) and {"file", "batch", "sha256"} <= set(entry):
            entries[entry["file"]] = entry
    return entries


def _rank_parts(out: Path) -> dict[str, dict]:
    """Shards listed by the rank journals of an unfinished run (and by the whole-file rank
    manifests that fastattr wrote before journals)."""
    shards: dict[str, dict] = {}
    for path in sorted(out.glob("manifest.rank*.json")):
        part = _read_manifest(path)
        if part:
            shards.update(part["shards"])
    for path in sorted(out.glob("manifest.rank*.jsonl")):
        shards.update(_read_journal(path))
    return shards


class ShardStore:
    """The writing side of a run folder: checksummed safetensors shards, one per batch, and the
    lists that name them: while running, one append-only journal per rank (a line per shard, so
    writing a shard costs the same at the millionth patient as at the first); at the end rank 0
    merges them into ``manifest.json``."""

    def __init__(self, out: Path, rank: int, world: int) -> None:
        self.out, self.rank, self.world = out, rank, world
        self.manifest_path = out / "manifest.json"
        self.journal_path = out / f"manifest.rank{rank}.jsonl"
        self.shards: dict[str, dict] = {}
        self.mine: dict[str, dict] = {}

    def recover(self, resume: bool) -> dict[int, dict]:
        """The finished shards of an earlier (possibly interrupted, possibly distributed) run,
        verified by checksum (corrupt ones dropped to be redone); returns them by batch index.
        This rank's journal is then rewritten with its verified shards only (no torn line left)."""
        existing = _read_manifest(self.manifest_path)
        if existing is not None and not resume:
            raise FileExistsError(f"{self.out} already holds an attribution run; pass resume=True to continue it")
        shards = dict(existing["shards"]) if existing else {}
        shards.update(_rank_parts(self.out))  # ranks of an interrupted run
        self.shards = _verified(self.out, shards, repair=True)
        self.mine = {n: e for n, e in self.shards.items() if e["batch"] % self.world == self.rank}
        lines = [json.dumps({"format": FORMAT})] + [json.dumps(e) for e in self.mine.values()]
        _write_atomic(self.journal_path, ("\n".join(lines) + "\n").encode())
        return {entry["batch"]: entry for entry in self.shards.values()}

    def write(self, index: int, tensors: dict[str, torch.Tensor], ids: dict[str, list[str]],
              positions: list[int]) -> None:
        """One batch's shard, then a line naming it in this rank's journal (a shard exists only
        once named; both are on disk, fsynced, before the next batch starts)."""
        name = f"shard-{index:08d}.safetensors"
        data = save(tensors, metadata={"ids": json.dumps(ids), "batch": str(index)})
        _write_atomic(self.out / name, data)
        entry = {"file": name, "batch": index, "patients": len(positions), "ids": ids, "positions": positions,
                 "sha256": hashlib.sha256(data).hexdigest()}
        with open(self.journal_path, "ab") as f:
            f.write((json.dumps(entry) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        self.mine[name] = entry

    def merge(self) -> None:
        """Rank 0: one manifest of every shard, rank journals and never-listed shards removed."""
        merged = dict(self.shards)
        merged.update(_rank_parts(self.out))
        merged = dict(sorted(merged.items(), key=lambda item: item[1]["batch"]))
        _write_atomic(self.manifest_path, json.dumps({"format": FORMAT, "complete": True,
                                                      "patients": sum(e["patients"] for e in merged.values()),
                                                      "shards": merged}, indent=1).encode())
        for part_path in [*self.out.glob("manifest.rank*.json"), *self.out.glob("manifest.rank*.jsonl")]:
            part_path.unlink()
        for stray in self.out.glob("shard-*.safetensors*"):  # written by a killed run, never listed
            if stray.name not in merged:
                stray.unlink()


def _sample_length(model: Any, sample: Mapping[str, Any]) -> int:
    """Positions of one sample over the model's features: non-padding entries of integer values,
    the first dim of other tensors, leaves of nested lists."""
    total = 0
    for key in getattr(model, "feature_keys", []):
        if key not in sample:
            continue
        feature = sample[key]
        value = FeatureLayout.of(model, key).value(feature) if isinstance(feature, tuple) else feature
        if isinstance(value, torch.Tensor):
            total += int((value != 0).sum()) if not value.is_floating_point() else (value.shape[0] if value.dim() else 1)
        elif isinstance(value, (list, tuple)):
            total += sum(len(v) if isinstance(v, (list, tuple)) else 1 for v in value)
        else:
            total += 1
    return max(total, 1)


class LengthSortedBatches:
    """Batches of a map-style dataset grouped by length, so each is padded only to its own longest.

    Samples are sorted by their length over the model's features (ties by position, so the
    order is the same on every run and rank) and cut into batches of ``batch_size`` samples or,
    with ``batch_tokens``, of at most that many padded positions (samples x the batch's longest).
    Iterating yields collated batches; ``positions[i]`` are batch ``i``'s dataset positions.
    """

    def __init__(self, dataset: Any, model: Any, *, batch_size: int | None = None, batch_tokens: int | None = None,
                 collate_fn: Any = None) -> None:
        if (batch_size is None) == (batch_tokens is None):
            raise ValueError("give exactly one of batch_size (samples per batch) and batch_tokens (padded positions "
                             "per batch)")
        for name, value in (("batch_size", batch_size), ("batch_tokens", batch_tokens)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
        self.dataset = dataset
        self.collate_fn = collate_fn or torch.utils.data.default_collate
        lengths = [_sample_length(model, dataset[i]) for i in range(len(dataset))]
        order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
        self.positions: list[list[int]] = []
        current: list[int] = []
        for i in order:
            longest = lengths[i]  # ascending: the newest sample is the batch's longest
            full = len(current) >= batch_size if batch_size is not None else \
                bool(current) and (len(current) + 1) * longest > batch_tokens
            if full:
                self.positions.append(current)
                current = []
            current.append(i)
        if current:
            self.positions.append(current)

    def __len__(self) -> int:
        return len(self.positions)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for members in self.positions:
            yield self.collate_fn([self.dataset[i] for i in members])


class DeviceLoader:
    """A dataloader whose tensors are moved to ``device`` as they are yielded; keeps ``len``,
    ``dataset`` and the dataset ``positions`` of :class:`LengthSortedBatches`."""

    def __init__(self, loader: Any, device: str | torch.device) -> None:
        self.loader, self.device, self.dataset = loader, device, getattr(loader, "dataset", None)
        self.positions = getattr(loader, "positions", None)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            yield {k: v.to(self.device) if hasattr(v, "to") else v for k, v in batch.items()}


def attribute_dataset(interpreter: Any, dataloader: Iterable[dict[str, Any]], out: str | Path, *,
                      save_probabilities: bool = True, resume: bool = True, progress: bool | None = None,
                      sort_by_length: bool = False, batch_tokens: int | None = None,
                      vocab: Mapping[str, Any] | None = None,
                      annotations: Mapping[str, Mapping[str, str]] | None = None,
                      **attribute_kwargs: Any) -> Path:
    """Attribute every batch of ``dataloader`` with ``interpreter`` and stream the results to ``out``.

    Args:
        interpreter: a fastattr interpreter (``IntegratedGradients``, ``CheferRelevance``) or any
            object with ``attribute(**kwargs, **batch)`` and ``model``.
        dataloader: batches as dicts (a PyHealth dataloader, ``fastattr.tools.cohort.CohortDataset``
            through a ``DataLoader``, or :class:`LengthSortedBatches`). Its order must be the same
            on every run and rank (``shuffle=False``); ids come from ``patient_id`` / ``visit_id``.
        out: a folder; created if needed.
        save_probabilities: also store the model's predicted probabilities and the class each
            patient was explained for (``target``), as the interpreter's own forward gave them.
        resume: continue a run found in ``out`` (verifying its shards by checksum and redoing any
            corrupt one); ``False`` refuses to touch a folder that already holds a run.
        progress: progress bar with patients/s and ETA (``None``: only on a terminal).
        sort_by_length: rebatch ``dataloader.dataset`` (through its ``collate_fn``) as
            :class:`LengthSortedBatches` of ``dataloader.batch_size`` samples, or of
            ``batch_tokens`` padded positions, so each batch is padded only to its own longest.
            Results keep their dataset positions in the store.
        batch_tokens: with ``sort_by_length``, the padded positions per batch instead of a count.
        vocab: ``{feature: {code: id} or [name by id]}`` to decode codes in tables and reports;
            by default each processor's ``code_vocab`` (PyHealth's), else codes are shown as ids.
            Stored in the run's ``run.json`` with the method and model, so the folder is
            self-describing. Each shard also stores the token ids (``input/<key>``) and where
            the padding is (``keep/<key>``) beside the attributions.
        annotations: ``{feature: {code name: label}}`` marked in reports (e.g. known risk
            factors; the synthetic cohort's planted codes and distractors).
        **attribute_kwargs: passed to ``interpreter.attribute`` (``steps``, ``target_class_idx``,
            ``return_convergence_delta``...). With ``return_convergence_delta`` the delta is stored.

    Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is started (NCCL on GPUs, gloo on
    CPUs) and rank r takes batches r, r + W, ...: the same batches as a single process, so the
    results are identical; every rank writes its own shards and rank 0 merges the manifest.
    A batch that runs out of CUDA memory is retried in halves before failing.
    """
    model = getattr(interpreter, "model", None)
    if sort_by_length and not isinstance(dataloader, LengthSortedBatches):
        dataset = getattr(dataloader, "dataset", None)
        if dataset is None or model is None:
            raise ValueError("sort_by_length needs a DataLoader over a map-style dataset (dataloader.dataset) and "
                             "an interpreter with .model")
        dataloader = LengthSortedBatches(dataset, model, batch_size=None if batch_tokens else dataloader.batch_size,
                                         batch_tokens=batch_tokens, collate_fn=getattr(dataloader, "collate_fn", None))
    elif batch_tokens is not None:
        raise ValueError("batch_tokens applies only with sort_by_length=True")
    out = Path(out)
    rank, world, started = _distributed()
    out.mkdir(parents=True, exist_ok=True)
    store = ShardStore(out, rank, world)
    done = store.recover(resume)
    if rank == 0 and model is not None:
        _write_run_info(out, run_info(interpreter, model, vocab, annotations, attribute_kwargs), resume)
    _barrier()  # every rank has read the previous state before any rank writes
    try:
        total_patients = len(dataloader.dataset)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        total_patients = None
    bar = tqdm(total=total_patients, unit="patient", desc=f"attributing (rank {rank}/{world})" if world > 1 else
               "attributing", disable=None if progress is None else not progress, smoothing=0.1)
    given = getattr(dataloader, "positions", None)  # LengthSortedBatches: dataset positions per batch
    seen = 0
    for index, batch in enumerate(dataloader):
        size = batch_size(batch)
        positions = list(given[index]) if given is not None else list(range(seen, seen + size))
        seen += size
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
        attributions, delta, predictions = _concat(_attribute_with_retry(interpreter, batch, index, attribute_kwargs))
        tensors = {f"attr/{k}": v.detach().contiguous().cpu() for k, v in attributions.items()}
        if delta is not None:
            tensors["convergence_delta"] = delta.detach().contiguous().cpu()
        if model is not None and hasattr(model, "feature_keys"):
            tensors.update(_inputs(model, batch, attributions))
        if save_probabilities and model is not None:
            if predictions is None:
                predictions = _predictions(model, batch, attribute_kwargs.get("target_class_idx"))
            tensors["probability"] = predictions[0].cpu().contiguous()
            tensors["target"] = predictions[1].cpu().contiguous()
        store.write(index, tensors, ids, positions)
        bar.update(size)
    bar.close()
    _barrier()
    if rank == 0:
        store.merge()
    _barrier()
    if started:
        dist.destroy_process_group()
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
        if not self.out.is_dir():
            raise FileNotFoundError(f"{self.out} is not a folder: give the output folder of a fastattr attribution run")
        manifest = _read_manifest(self.out / "manifest.json")
        if manifest is None:
            unfinished = any(self.out.glob("manifest.rank*.json*"))
            raise FileNotFoundError(
                f"{self.out} is not a fastattr attribution run: it holds no manifest.json"
                + (" (only the rank manifests of an unfinished run: run the same attribution again to resume and "
                   "finish it)" if unfinished else " (write one with fastattr attribute or attribute_dataset)"))
        self.complete = bool(manifest.get("complete"))
        info_path = self.out / RUN_INFO
        #: ``run.json``: method, model, per-feature token-ness and vocabulary, annotations (``None``
        #: for a run written before fastattr stored it).
        self.info: dict[str, Any] | None = json.loads(info_path.read_text()) if info_path.exists() else None
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
        for _, _, tensors in self.shards_with_positions():
            yield tensors

    def shards_with_positions(self) -> Iterator[tuple[list[int], dict[str, list], dict[str, torch.Tensor]]]:
        """Per shard, in batch order: its samples' dataset positions, their ids
        (``{"patient_id": [...], "visit_id": [...]}``, as the manifest lists them) and its tensors."""
        row = 0
        for name, entry in self.shards.items():
            positions = entry.get("positions") or list(range(row, row + entry["patients"]))
            row += entry["patients"]
            with self._open(name) as f:
                yield positions, entry["ids"], {k: f.get_tensor(k) for k in f.keys()}

    def to_dataframe(self, features: list[str] | None = None):
        """The run as one long pandas table: a row per (sample, feature, visit, position) that is
        not padding, with ids, decoded code, attribution, probability and explained class, in
        sample order (see :mod:`fastattr.tools.tables`; needs the ``report`` extra)."""
        from fastattr.tools.tables import to_dataframe

        return to_dataframe(self, features=features)

    def export(self, path: str | Path, format: str | None = None, **kwargs: Any) -> Path:
        """Stream the long table to a parquet or CSV file (see :func:`fastattr.tools.tables.export`)."""
        from fastattr.tools.tables import export

        return export(self, path, format=format, **kwargs)

    def summarize(self, by_class: bool = False, features: list[str] | None = None):
        """Per-code cohort statistics in one pass (see :func:`fastattr.tools.tables.summarize`)."""
        from fastattr.tools.tables import summarize

        return summarize(self, by_class=by_class, features=features)

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


class CohortDataset(torch.utils.data.Dataset):
    """A :class:`fastattr.tools.synthetic.SyntheticCohort` (or the patients ``indices`` of it) as a
    map-style dataset of patient dicts; ``patient_id`` is ``P`` and the patient's cohort index.

    Items hold the codes padded to the cohort's ``max_codes`` (so the default collate works);
    pass ``collate_fn=CohortDataset.collate`` to pad each batch only to its own longest patient.
    """

    def __init__(self, cohort: Any, indices: Sequence[int] | None = None) -> None:
        self.cohort = cohort
        self.indices = list(range(len(cohort))) if indices is None else [int(i) for i in indices]
        if any(not 0 <= i < len(cohort) for i in self.indices):
            raise IndexError(f"indices must lie in [0, {len(cohort)}) (the cohort's patients)")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        patient = self.indices[index]
        row = self.cohort.batch([patient])
        return {"patient_id": f"P{patient:08d}", "codes": row["codes"][0], "label": row["label"][0]}

    @staticmethod
    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        """Stack items, then cut the codes after the batch's last non-padding column."""
        batch = torch.utils.data.default_collate(items)
        codes = batch["codes"]
        used = (codes != 0).any(dim=0).nonzero()
        batch["codes"] = codes[:, : int(used.max()) + 1 if len(used) else 1]
        return batch
