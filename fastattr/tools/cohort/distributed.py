"""torch.distributed for cohort runs: the process group under torchrun, barriers, and steps that
fail on every rank together."""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from fastattr.tools.store import RunLockedError


def start_process_group() -> tuple[int, int, bool]:
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


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def on_every_rank(step: Any) -> Any:
    """Run ``step()`` on every rank; when it fails on any, every rank raises (the failing one its
    own error), instead of the others waiting at the next barrier for a rank that left."""
    error, result = None, None
    try:
        result = step()
    except Exception as exc:
        error = exc
    if dist.is_available() and dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        failed = torch.tensor([error is not None], dtype=torch.int32, device=device)
        dist.all_reduce(failed)
        if error is None and int(failed.item()):
            error = RunLockedError("another rank of this run could not start (see its error); nothing was written")
    if error is not None:
        raise error
    return result
