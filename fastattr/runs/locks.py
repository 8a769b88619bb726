"""One writer per run folder and rank: an OS lock (``flock``) on ``.lock.rank<r>``, released by the
operating system when the process ends however it ends, its file saying who holds it."""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any


class RunLockedError(RuntimeError):
    """Another live process is writing the same run folder (and rank)."""


class Lock:
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


def holder(path: Path) -> str:
    try:
        who = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        who = {}
    if not who:
        return "a process that has not said who it is yet"
    return f"process {who.get('pid')} on host {who.get('host')}, started {who.get('started')}"
