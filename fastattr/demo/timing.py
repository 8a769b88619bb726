"""Timing side by side: each function warmed up once, then called in interleaved rounds so that a
drifting machine load hits every method alike (CUDA events on a GPU)."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, device: str) -> dict[str, dict[str, float]]:
    """Median/min/max milliseconds and peak CUDA MiB per function: one warm-up call each (which
    also measures peak memory on CUDA), then ``repeats`` rounds calling every function once, so
    drifting machine load hits every method alike. CUDA calls are timed with CUDA events."""
    cuda = device.startswith("cuda")
    stats: dict[str, dict[str, float]] = {}
    times: dict[str, list[float]] = {k: [] for k in fns}
    peaks = {k: float("nan") for k in fns}
    for name, fn in fns.items():  # warm-up, and peak memory of one call
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        fn()
        if cuda:
            torch.cuda.synchronize()
            peaks[name] = (torch.cuda.max_memory_allocated() - before) / 2**20
    for _ in range(repeats):  # interleaved, so drifting load hits every method alike
        for name, fn in fns.items():
            if cuda:
                start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start_event.record()
                fn()
                end_event.record()
                torch.cuda.synchronize()
                times[name].append(start_event.elapsed_time(end_event) / 1e3)
            else:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    for name, t in times.items():
        stats[name] = {"median_ms": statistics.median(t) * 1e3, "min_ms": min(t) * 1e3, "max_ms": max(t) * 1e3,
                       "peak_mem_mb": peaks[name]}
    return stats
