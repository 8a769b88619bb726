"""Markdown table (with peak CUDA memory; NaN on the CPU) for the comparison scripts (timing itself:
``fastattr.demo.timing.time_interleaved``)."""
from __future__ import annotations


def table(stats: dict[str, dict[str, float]], base: str) -> None:
    """Print median/min/max milliseconds and each method's speedup over ``base``."""
    ref = stats[base]["median_ms"]
    print(f"| method | median ms | min ms | max ms | speedup vs {base} | peak CUDA MiB |")
    print("|---|---|---|---|---|---|")
    for name, s in stats.items():
        print(f"| {name} | {s['median_ms']:.2f} | {s['min_ms']:.2f} | {s['max_ms']:.2f} | "
              f"{ref / s['median_ms']:.2f}x | {s.get('peak_mem_mb', float('nan')):.0f} |")
