"""Interleaved timing shared by the comparison scripts."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, device: str) -> dict[str, list[float]]:
    """Seconds per call of each function; one warm-up each, then rounds that call every function
    once, so drifting machine load hits every method alike. CUDA work is synchronized."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return times


def table(times: dict[str, list[float]], base: str) -> None:
    """Print a Markdown table of median/min/max and the speedup of each method over ``base``."""
    ref = statistics.median(times[base])
    print(f"| method | median ms | min ms | max ms | speedup vs {base} |")
    print("|---|---|---|---|---|")
    for name, t in times.items():
        med = statistics.median(t)
        print(f"| {name} | {med * 1e3:.1f} | {min(t) * 1e3:.1f} | {max(t) * 1e3:.1f} | {ref / med:.2f}x |")
