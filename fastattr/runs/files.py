"""A run folder's files: written atomically (never half a file, a full disk named as such), listed in
a manifest checked by SHA-256, and described by ``run.json`` (method, model, features and their
vocabularies, annotations, how the batches were cut, timing)."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from fastattr.interpret.features import FeatureLayout, code_vocab

FORMAT = "fastattr-attributions/1"
RUN_FORMAT = "fastattr-run/1"
RUN_INFO = "run.json"
# beside a per-sample tensor NAME of a shard, shape/NAME [B, dims] holds each sample's own row shape
# (fastattr.runs.row_shapes); runs written before it have none and read as stored
SHAPE_PREFIX = "shape/"


#: the interpreter classes a run may record as its method (a resume must not switch between them)
INTERPRETER_NAMES = ("IntegratedGradients", "CheferRelevance", "ShapExplainer", "LimeExplainer", "DeepLift",
                     "AttentionRollout", "RandomBaseline", "GIM", "IntegratedGradientGIM")


def sha256_of(path: Path) -> str:
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
def space_for(out: Path, what: str) -> Iterator[None]:
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
    with space_for(path.parent, path.name):
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise


def identity(path: Path) -> list[int]:
    """What changes when anyone replaces or rewrites a file: inode, size, modification time."""
    st = os.stat(path)
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def read_manifest(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fastattr attribution manifest (format {manifest.get('format')!r})")
    return manifest


def intact(path: Path, sha256: str) -> bool:
    return path.exists() and sha256_of(path) == sha256


def verified(out: Path, shards: dict[str, dict], repair: bool) -> dict[str, dict]:
    """Shards whose file matches its checksum; with ``repair`` the others are dropped to be redone,
    without it a mismatch is an error."""
    good = {}
    for name, entry in shards.items():
        path = out / entry["file"]
        if intact(path, entry["sha256"]):
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
    raise TypeError(f"vocab[{key!r}] must be a {{code: id}} mapping or a list of names by id; got "
                    f"{type(vocab).__name__}")


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
        given = vocab.pop(key, None)
        if given is None:
            given = code_vocab(model, key)
        features[key] = {"token": FeatureLayout.of(model, key).token,
                         "vocab": None if given is None else _names(key, given)}
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
            "options": {k: _json_safe(v) for k, v in {**_defaults(interpreter), **(attribute_kwargs or {})}.items()},
            "batching": dict(batching or {})}


def _defaults(interpreter: Any) -> dict[str, Any]:
    """The interpreter's own defaults a call may leave out (IG's ``steps`` and ``tolerance``)."""
    return {k: getattr(interpreter, k) for k in ("steps", "tolerance") if getattr(interpreter, k, None) is not None}


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
        # fastattr's interpreters; a wrapper of one (a test's counter) is not another method
        known = set(INTERPRETER_NAMES)
        parts = ("method", "features") if {old.get("method"), info["method"]} <= known else ("features",)
        for part in parts:
            if old.get(part) != info[part]:
                what = "method" if part == "method" else "features or vocabulary"
                raise ValueError(f"{out} holds a run whose {what} differs from this call's ({RUN_INFO}); resume it "
                                 "with the same interpreter, model and vocab, or use another folder")
    write_atomic(out / RUN_INFO, json.dumps(info, indent=1).encode())
