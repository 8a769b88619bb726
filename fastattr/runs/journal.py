"""A run's journals: while a run goes, each rank appends one fsynced JSON line per finished shard
to ``manifest.rank<r>.jsonl`` (after a format line); a line cut short by a kill is skipped and its
shard redone. Rank 0 merges them into ``manifest.json`` at the end (:class:`fastattr.runs.writer.ShardStore`)."""
from __future__ import annotations

import json
from pathlib import Path

from fastattr.runs.files import FORMAT, read_manifest


def read_journal(path: Path) -> dict[str, dict]:
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


def rank_parts(out: Path) -> dict[str, dict]:
    """Shards listed by the rank journals of an unfinished run (and by the whole-file rank
    manifests that fastattr wrote before journals)."""
    shards: dict[str, dict] = {}
    for path in sorted(out.glob("manifest.rank*.json")):
        part = read_manifest(path)
        if part:
            shards.update(part["shards"])
    for path in sorted(out.glob("manifest.rank*.jsonl")):
        shards.update(read_journal(path))
    return shards
