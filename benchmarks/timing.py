"""Markdown table for the comparison scripts (timing itself: ``fastattr.bench.time_interleaved``)."""
from __future__ import annotations


def table(stats: dict[str, dict[str, float]], base: str) -> None:
    """Print median/min/max milliseconds and each method's speedup over ``base``."""
    ref = stats[base]["median_ms"]
    print(f"| method | median ms | min ms | max ms | speedup vs {base} |")
    print("|---|---|---|---|---|")
    for name, s in stats.items():
        print(f"| {name} | {s['median_ms']:.1f} | {s['min_ms']:.1f} | {s['max_ms']:.1f} | {ref / s['median_ms']:.2f}x |")
