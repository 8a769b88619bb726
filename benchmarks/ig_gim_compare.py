"""fastattr.IntegratedGradientGIM against PyHealth 2.1.0's, side by side in one run, with both
IntegratedGradients beside them, on the workload of issue 33: PyHealth's Transformer as its
interpretability example builds it (3 layers, 4 heads, d128), a long-tailed two-feature cohort
(conditions 3-40 codes, procedures 1-12), batches of 16, 50 steps. Each batch's attributions are first
checked equal (relative error per key); then the four are timed interleaved (after one warm-up call each:
fastattr's once-per-layout checks are then cached, as over a loader), and the ratios printed with the load
average of the machine.

Run in the PyHealth environment:
``PYTHONPATH=. $(bash tests/pyhealth_env.sh)/bin/python -P benchmarks/ig_gim_compare.py --threads 2``
(it reuses the cohort and model of ``benchmarks/perturbation_compare.py``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from benchmarks.perturbation_compare import build, relative_error
from fastattr.interpret.gradient.ig import IntegratedGradients
from fastattr.interpret.gradient.ig_gim import IntegratedGradientGIM


def explainers(model, steps: int) -> dict:
    from pyhealth.interpret.methods import IntegratedGradients as TheirIG
    from pyhealth.interpret.methods.ig_gim import IntegratedGradientGIM as TheirIGGIM

    return {"pyhealth IG-GIM": TheirIGGIM(model, steps=steps),
            "fastattr IG-GIM": IntegratedGradientGIM(model, steps=steps),
            "pyhealth IG": TheirIG(model, steps=steps), "fastattr IG": IntegratedGradients(model, steps=steps)}


def check(methods: dict, batch: dict) -> dict[str, float]:
    """Worst relative error of fastattr against PyHealth, per method."""
    out = {}
    for name in ("IG-GIM", "IG"):
        ref, got = methods[f"pyhealth {name}"].attribute(**batch), methods[f"fastattr {name}"].attribute(**batch)
        out[name] = max(relative_error(got[k], ref[k]) for k in ref)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=48)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=1, help="batches of the loader timed")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, loader = build(args.patients, args.batch, seed=0)
    batches = loader[:args.batches]
    methods = explainers(model, args.steps)
    for i, batch in enumerate(batches):
        lengths = {k: (batch[k] != 0).sum(1).tolist() for k in ("conditions", "procedures")}
        errors = check(methods, batch)
        groups = {name: methods[f"fastattr {name}"].last_groups for name in ("IG-GIM", "IG")}
        print(f"batch {i}: lengths {lengths}; relative error vs PyHealth {errors}; fastattr's length groups {groups}")
    times: dict[str, list[float]] = {name: [] for name in methods}
    load_before = os.getloadavg()
    for _ in range(args.repeats):
        for name, method in methods.items():
            start = time.perf_counter()
            for batch in batches:
                method.attribute(**batch)
            times[name].append(time.perf_counter() - start)
    load_after = os.getloadavg()
    median = {name: statistics.median(t) * 1000 / len(batches) for name, t in times.items()}
    print(f"torch threads {torch.get_num_threads()}, load average (1/5/15 min) before {load_before}, "
          f"after {load_after}")
    for name, ms in median.items():
        print(f"{name:16s} {ms:9.1f} ms per batch (runs: {', '.join(f'{t * 1000:.0f}' for t in times[name])})")
    gim = median["pyhealth IG-GIM"] / median["fastattr IG-GIM"]
    ig = median["pyhealth IG"] / median["fastattr IG"]
    print(f"IG-GIM speed-up {gim:.2f}x; IG speed-up {ig:.2f}x; IG-GIM's at {100 * gim / ig:.0f}% of IG's")


if __name__ == "__main__":
    main()
