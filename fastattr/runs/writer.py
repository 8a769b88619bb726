"""Writing a run folder: :class:`ShardStore`, what ``attribute_dataset`` and ``fastattr evaluate`` write through.

Storage: one safetensors file per batch. safetensors keeps each attribution's dtype and shape
exactly (no flattening into table columns), is read lazily through a memory map, and is a small
dependency; the patient/visit ids of a shard go in its header metadata, so an id index is built
from headers alone. A JSON manifest lists every finished shard with its SHA-256, its batch index
and its ids; a shard exists only once it is listed. Shards are written to a temporary name and
renamed; while a run goes, each rank appends one fsynced line per shard to its journal (a line cut
short by a kill is ignored and its shard redone), and at the end rank 0 merges the journals into
the manifest (written to a temporary name and renamed). So a killed process leaves either the old
state or the new one, and listing a shard costs the same at the end of a long run as at its start.
The rest of the run folder lives beside it in :mod:`fastattr.runs`.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path

import torch
from safetensors.torch import save

from fastattr.runs.files import FORMAT, identity, intact, read_manifest, space_for, verified, write_atomic
from fastattr.runs.journal import rank_parts
from fastattr.runs.locks import Lock, RunLockedError, holder


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
        self._locks: list[Lock] = []

    def lock(self) -> None:
        """Take this rank's lock and a shared lock for this number of processes, or raise
        :class:`RunLockedError` naming who holds the run."""
        mine = Lock(self.out / f".lock.rank{self.rank}")
        if not mine.held:
            raise RunLockedError(f"{self.out} is being written by another fastattr run: rank {self.rank} is held by "
                                 f"{holder(self.out / f'.lock.rank{self.rank}')}. Wait for it to finish or stop it, "
                                 "then run the same command again to resume (two writers of one folder would lose "
                                 "the run)")
        self._locks.append(mine)
        world = Lock(self.out / f".lock.world{self.world}", shared=True)
        if not world.held:  # a writer with another number of processes is checking this one: let it win
            self.release()
            raise RunLockedError(f"{self.out} is being opened by another fastattr run at the same time; run again")
        self._locks.append(world)
        for other in self.out.glob(".lock.world*"):
            if other.name == f".lock.world{self.world}":
                continue
            probe = Lock(other)
            if not probe.held:
                self.release()
                raise RunLockedError(f"{self.out} is being written by another fastattr run with "
                                     f"{other.name.removeprefix('.lock.world')} processes (rank 0 held by "
                                     f"{holder(self.out / '.lock.rank0')}); wait for it to finish or stop it, "
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
        existing = read_manifest(self.manifest_path)
        if existing is not None and not resume:
            raise FileExistsError(f"{self.out} already holds an attribution run; pass resume=True to continue it")
        shards = dict(existing["shards"]) if existing else {}
        shards.update(rank_parts(self.out))  # ranks of an interrupted run
        self.shards = {n: {**e, "identity": identity(self.out / e["file"])}
                       for n, e in verified(self.out, shards, repair=True).items()}
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
                 "sha256": hashlib.sha256(data).hexdigest(), "identity": identity(self.out / name)}
        with space_for(self.out, self.journal_path.name):  # a line cut short is skipped on resume, its shard redone
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
        merged.update(rank_parts(self.out))
        changed = [n for n, e in merged.items() if e.get("identity") != _identity_or_none(self.out / e["file"])]
        lost = [n for n in changed if not intact(self.out / merged[n]["file"], merged[n]["sha256"])]
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
        return identity(path)
    except FileNotFoundError:
        return None
