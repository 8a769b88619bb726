"""torch.distributed for cohort runs: the process group under torchrun, barriers, and steps that
fail on every rank together.

What a torchrun run equals. Rank r attributes batches r, r + W, ... of the very batches a single
process cuts, so every patient is attributed in the same batch either way, and the only difference
left is the arithmetic inside a process. On CPUs that depends on PyTorch's intra-op thread count:
its kernels may round differently on one thread than on several (measured with torch 2.13: the CPU
softmax backward, inside every Transformer's backward, gives other last bits on 1 thread than on 2
or more, for the same input tensor). torchrun gives each rank ``OMP_NUM_THREADS=1`` unless the user
set it, while a single process takes every core. So a CPU run under torchrun is bitwise the single
process's run at the same thread count (``OMP_NUM_THREADS=1`` or ``torch.set_num_threads(1)``), and
within float rounding of it at its default threads (a few float32 ulps of a row's largest value:
tests/test_distributed_exact.py). The runner does not pin the thread count to make the two equal:
pinning a single process to one thread takes the machine's other cores from every CPU run that does
not use torchrun, and giving each rank every core oversubscribes the machine W times; the user who
needs bitwise agreement sets the thread count, which the runner leaves as it finds it."""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from fastattr.runs.locks import RunLockedError


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
