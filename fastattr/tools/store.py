"""The run folder: what ``attribute_dataset`` writes and ``load_attributions`` reads.

Storage: one safetensors file per batch. safetensors keeps each attribution's dtype and shape
exactly (no flattening into table columns), is read lazily through a memory map, and is a small
dependency; the patient/visit ids of a shard go in its header metadata, so an id index is built
from headers alone. A JSON manifest lists every finished shard with its SHA-256, its batch index
and its ids; a shard exists only once it is listed. Shards are written to a temporary name and
renamed; while a run goes, each rank appends one fsynced line per shard to its journal (a line cut
short by a kill is ignored and its shard redone), and at the end rank 0 merges the journals into
the manifest (written to a temporary name and renamed). So a killed process leaves either the old
state or the new one, and listing a shard costs the same at the end of a long run as at its start.
``run.json`` describes the run (method, model, features and their vocabularies, annotations).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from fastattr.tools import frames

FORMAT = "fastattr-attributions/1"
RUN_FORMAT = "fastattr-run/1"
RUN_INFO = "run.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class DiskFullError(OSError):
    """The disk (or quota) holding a run folder is full; what was finished is kept for a resume."""

    def __str__(self) -> str:
        return str(self.strerror)


def _disk_full(out: Path, what: str, exc: OSError) -> DiskFullError:
    return DiskFullError(exc.errno, f"{out}: the disk is full (no space left on device while writing {what}); free "
                         "space, or copy the folder to a larger disk, then run the same command again: it resumes "
                         "from the batches already finished")


@contextlib.contextmanager
def _space_for(out: Path, what: str) -> Iterator[None]:
    """Writes inside that find the disk (or quota) full raise one :class:`DiskFullError` naming ``out``."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(out, what, exc) from exc
        raise


def write_atomic(path: Path, data: bytes) -> None:
    """``data`` to ``path`` through a temporary file in the same folder, fsynced, then renamed over
    it: readers see the old file or the new one. A failed write leaves no temporary file; a full
    disk is a :class:`DiskFullError` naming the folder."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with _space_for(path.parent, path.name):
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise


def _identity(path: Path) -> list[int]:
    """What changes when anyone replaces or rewrites a file: inode, size, modification time."""
    st = os.stat(path)
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def _read_manifest(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fastattr attribution manifest (format {manifest.get('format')!r})")
    return manifest


def _intact(path: Path, sha256: str) -> bool:
    return path.exists() and _sha256(path) == sha256


def _verified(out: Path, shards: dict[str, dict], repair: bool) -> dict[str, dict]:
    """Shards whose file matches its checksum; with ``repair`` the others are dropped to be redone,
    without it a mismatch is an error."""
    good = {}
    for name, entry in shards.items():
        path = out / entry["file"]
        if _intact(path, entry["sha256"]):
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
             attribute_kwargs: Mapping[str, Any] | None = None,
             batching: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a run folder says about itself (``run.json``): the method, the model, and per feature
    whether it is a token feature and its vocabulary (names by id: ``vocab[key]`` when given,
    else the processor's ``code_vocab`` inverted, else ``None``: codes are then shown as ids),
    plus ``annotations`` (``{feature: {code name: label}}``, e.g. planted codes) for reports and
    ``batching`` (whether and how the batches were sorted by length)."""
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
            "options": {k: _json_safe(v) for k, v in (attribute_kwargs or {}).items()},
            "batching": dict(batching or {})}


def record_timing(out: Path, timing: Mapping[str, float]) -> None:
    """Add the last (resumed) pass's timing to ``run.json``: wall seconds, seconds inside the
    interpreter, patients attributed (rank 0's, under torchrun)."""
    info = read_run_info(out)
    if info is not None:
        write_atomic(Path(out) / RUN_INFO, json.dumps({**info, "timing": dict(timing)}, indent=1).encode())


def read_run_info(out: Path) -> dict[str, Any] | None:
    """``run.json`` of a run folder, or ``None`` where there is none."""
    path = Path(out) / RUN_INFO
    return json.loads(path.read_text()) if path.exists() else None


def write_run_info(out: Path, info: dict[str, Any], resume: bool) -> None:
    """Write ``run.json``, or check a resumed run was made with the same features and vocabulary."""
    old = read_run_info(out) if resume else None
    if old is not None:
        known = {"IntegratedGradients", "CheferRelevance"}  # a wrapper of one (a test's counter) is not another method
        parts = ("method", "features") if {old.get("method"), info["method"]} <= known else ("features",)
        for part in parts:
            if old.get(part) != info[part]:
                what = "method" if part == "method" else "features or vocabulary"
                raise ValueError(f"{out} holds a run whose {what} differs from this call's ({RUN_INFO}); resume it "
                                 "with the same interpreter, model and vocab, or use another folder")
    write_atomic(out / RUN_INFO, json.dumps(info, indent=1).encode())


def _read_journal(path: Path) -> dict[str, dict]:
    """A rank's journal: a format line, then one JSON line per finished shard. A line that is not
    one of ours (cut short by a kill, garbage, something else's JSON, a missing format line) is
    skipped: its shard, if any, is redone. Only a journal of another format is an error."""
    entries: dict[str, dict] = {}
    lines = path.read_bytes().split(b"\n")
    for line in lines[:-1]:  # the part after the last newline is a torn write
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict):
            continue
        if "format" in entry and len(entry) == 1:
            if entry["format"] != FORMAT:
                raise ValueError(f"{path} is not a fastattr attribution journal (format {entry['format']!r})")
        elif {"file", "batch", "sha256", "patients", "ids"} <= set(entry) and isinstance(entry["file"], str) \
                and isinstance(entry["batch"], int):
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


class RunLockedError(RuntimeError):
    """Another live process is writing the same run folder (and rank)."""


class _Lock:
    """An exclusive ``flock`` on a file of the run folder, held while a writer runs and released by
    the operating system when the process ends however it ends (a SIGKILL included). The file
    says who holds it; it is never deleted (deleting a lock file races with the next taker)."""

    def __init__(self, path: Path, shared: bool = False) -> None:
        self.path, self.fd = path, os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def say(self, holder: dict[str, Any]) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(holder).encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


def _holder(path: Path) -> str:
    try:
        who = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        who = {}
    if not who:
        return "a process that has not said who it is yet"
    return f"process {who.get('pid')} on host {who.get('host')}, started {who.get('started')}"


class ShardStore:
    """The writing side of a run folder: checksummed safetensors shards, one per batch, and the
    lists that name them: while running, one append-only journal per rank (a line per shard, so
    writing a shard costs the same at the millionth patient as at the first); at the end rank 0
    merges them into ``manifest.json``.

    One writer per run and rank: :meth:`lock` takes an OS lock that a second writer of the same
    rank (or a writer of the same folder with another number of processes) fails on at once,
    naming the holder; a killed writer's lock goes with it. Each journal line records the shard
    file's identity when written; the merge checks it again, so a manifest never names bytes
    another process replaced."""

    def __init__(self, out: Path, rank: int, world: int) -> None:
        self.out, self.rank, self.world = out, rank, world
        self.manifest_path = out / "manifest.json"
        self.journal_path = out / f"manifest.rank{rank}.jsonl"
        self.shards: dict[str, dict] = {}
        self.mine: dict[str, dict] = {}
        self._locks: list[_Lock] = []

    def lock(self) -> None:
        """Take this rank's lock and a shared lock for this number of processes, or raise
        :class:`RunLockedError` naming who holds the run."""
        mine = _Lock(self.out / f".lock.rank{self.rank}")
        if not mine.held:
            raise RunLockedError(f"{self.out} is being written by another fastattr run: rank {self.rank} is held by "
                                 f"{_holder(self.out / f'.lock.rank{self.rank}')}. Wait for it to finish or stop it, "
                                 "then run the same command again to resume (two writers of one folder would lose "
                                 "the run)")
        self._locks.append(mine)
        world = _Lock(self.out / f".lock.world{self.world}", shared=True)
        if not world.held:  # a writer with another number of processes is checking this one: let it win
            self.release()
            raise RunLockedError(f"{self.out} is being opened by another fastattr run at the same time; run again")
        self._locks.append(world)
        for other in self.out.glob(".lock.world*"):
            if other.name == f".lock.world{self.world}":
                continue
            probe = _Lock(other)
            if not probe.held:
                self.release()
                raise RunLockedError(f"{self.out} is being written by another fastattr run with "
                                     f"{other.name.removeprefix('.lock.world')} processes (rank 0 held by "
                                     f"{_holder(self.out / '.lock.rank0')}); wait for it to finish or stop it, "
                                     "then run again to resume")
            probe.release()
        mine.say({"pid": os.getpid(), "host": socket.gethostname(), "rank": self.rank, "world": self.world,
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")})

    def release(self) -> None:
        """Let go of the locks (also done by the OS when the process ends)."""
        for held in self._locks:
            held.release()
        self._locks = []

    def recover(self, resume: bool) -> dict[int, dict]:
        """The finished shards of an earlier (possibly interrupted, possibly distributed) run,
        verified by checksum (corrupt ones dropped to be redone); returns them by batch index.
        This rank's journal is then rewritten with its verified shards only (no torn line left)."""
        existing = _read_manifest(self.manifest_path)
        if existing is not None and not resume:
            raise FileExistsError(f"{self.out} already holds an attribution run; pass resume=True to continue it")
        shards = dict(existing["shards"]) if existing else {}
        shards.update(_rank_parts(self.out))  # ranks of an interrupted run
        self.shards = {n: {**e, "identity": _identity(self.out / e["file"])}
                       for n, e in _verified(self.out, shards, repair=True).items()}
        self.mine = {n: e for n, e in self.shards.items() if e["batch"] % self.world == self.rank}
        lines = [json.dumps({"format": FORMAT})] + [json.dumps(e) for e in self.mine.values()]
        write_atomic(self.journal_path, ("\n".join(lines) + "\n").encode())
        return {entry["batch"]: entry for entry in self.shards.values()}

    def write(self, index: int, tensors: dict[str, torch.Tensor], ids: dict[str, list[str]],
              positions: list[int]) -> None:
        """One batch's shard, then a line naming it in this rank's journal (a shard exists only
        once named; both are on disk, fsynced, before the next batch starts)."""
        name = f"shard-{index:08d}.safetensors"
        data = save(tensors, metadata={"ids": json.dumps(ids), "batch": str(index)})
        write_atomic(self.out / name, data)
        entry = {"file": name, "batch": index, "patients": len(positions), "ids": ids, "positions": positions,
                 "sha256": hashlib.sha256(data).hexdigest(), "identity": _identity(self.out / name)}
        with _space_for(self.out, self.journal_path.name):  # a line cut short is skipped on resume, its shard redone
            with open(self.journal_path, "ab") as f:
                f.write((json.dumps(entry) + "\n").encode())
                f.flush()
                os.fsync(f.fileno())
        self.mine[name] = entry

    def merge(self) -> None:
        """Rank 0: one manifest of every shard, rank journals and never-listed shards removed.
        A shard whose file is no longer the one its journal line describes (another process
        replaced it) is checked by its checksum; if that fails it is left out, the journals are
        kept and the run is not finished: running it again redoes that batch."""
        merged = dict(self.shards)
        merged.update(_rank_parts(self.out))
        changed = [n for n, e in merged.items() if e.get("identity") != _identity_or_none(self.out / e["file"])]
        lost = [n for n in changed if not _intact(self.out / merged[n]["file"], merged[n]["sha256"])]
        if lost:
            raise RuntimeError(f"{self.out}: {len(lost)} shard(s) ({', '.join(sorted(lost)[:3])}) were replaced by "
                               "another process after this run wrote them; the run is not finished. Make sure one "
                               "process writes the folder, then run the same command again: it redoes those batches")
        merged = dict(sorted(merged.items(), key=lambda item: item[1]["batch"]))
        write_atomic(self.manifest_path, json.dumps({"format": FORMAT, "complete": True,
                                                      "patients": sum(e["patients"] for e in merged.values()),
                                                      "shards": merged}, indent=1).encode())
        for part_path in [*self.out.glob("manifest.rank*.json"), *self.out.glob("manifest.rank*.jsonl")]:
            part_path.unlink()
        for stray in self.out.glob("shard-*.safetensors*"):  # written by a killed run, never listed
            if stray.name not in merged:
                stray.unlink()


def _identity_or_none(path: Path) -> list[int] | None:
    try:
        return _identity(path)
    except FileNotFoundError:
        return None


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
        manifest = _read_manifest(self.out / "manifest.json")
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

    def scores(self) -> Attributions | None:
        """The faithfulness scores ``fastattr evaluate`` stored for this run (``RUN/faithfulness``,
        see :mod:`fastattr.tools.scores`), opened like a run, or ``None``."""
        folder = self.out / SCORES_FOLDER
        return Attributions(folder) if (folder / "manifest.json").exists() else None

    def to_dataframe(self, features: list[str] | None = None):
        """The run as one long pandas table: a row per (sample, feature, visit, position) that is
        not padding, with ids, decoded code, attribution, probability and explained class, in
        sample order (see :mod:`fastattr.tools.frames`; needs the ``report`` extra)."""
        return frames.to_dataframe(self, features=features)

    def export(self, path: str | Path, format: str | None = None, **kwargs: Any) -> Path:
        """Stream the long table to a parquet or CSV file (see :func:`fastattr.tools.frames.export`)."""
        return frames.export(self, path, format=format, **kwargs)

    def summarize(self, by_class: bool = False, features: list[str] | None = None):
        """Per-code cohort statistics in one pass (see :func:`fastattr.tools.frames.summarize`)."""
        return frames.summarize(self, by_class=by_class, features=features)

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
