"""What the per-batch padding check costs: the time spent inside it, as a share of each method's calls.

    python -P benchmarks/padding_check_cost.py --patients 256 --batch 32 --repeats 3   # PyHealth environment

A Transformer over one long-tailed token feature (PyHealth's when it imports, else fastattr's own; median 15
codes, longest 200), which ignores padding, so every batch runs trimmed and is checked: IG (50 steps) probes
the logits at the input and the baseline (two padded and two trimmed no-grad forwards), Chefer pads each
group's samples one position further (one no-grad forward at the groups' widths; its groups' own logits are
the reference), the evaluator trims the unablated samples in its length groups (one forward at the groups'
widths; its padded forward is PyHealth's own). The check's functions are wrapped with a timer; nothing else
changes.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # appended: the installed packages come first

import fastattr  # noqa: E402
import fastattr.metrics  # noqa: E402
from fastattr.demo.bench import cohort_loaders, pyhealth_available  # noqa: E402
from fastattr.interpret.attention import chefer as chefer_module  # noqa: E402
from fastattr.interpret.gradient.ig import IntegratedGradients  # noqa: E402
from fastattr.metrics.removal import RemovalScorer  # noqa: E402

CHECKS = {"IG": (IntegratedGradients, "_padding_difference"), "Chefer": (chefer_module, "extended_difference"),
          "Evaluator": (RemovalScorer, "trimming_allowed")}


def timed_check(owner: type, name: str, spent: list[float]) -> None:
    """Wrap ``owner.name`` so that the seconds spent inside it add up in ``spent[0]``."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start
    setattr(owner, name, wrapper)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    use_pyhealth = pyhealth_available()
    model, _, loader = cohort_loaders(args.patients, 15, 200, 2, 4, 64, "cpu", use_pyhealth)
    batches = list(loader(args.batch))
    ig, chefer = fastattr.IntegratedGradients(model), fastattr.CheferRelevance(model)
    attributions, trimmed = [], {"IG": 0, "Chefer": 0, "Evaluator": "-"}
    for b in batches:
        attributions.append(ig.attribute(**b))
        chefer.attribute(**b)
        trimmed["IG"] += len(ig.last_groups) > 1
        trimmed["Chefer"] += len(chefer.last_groups) > 1
    evaluator = fastattr.metrics.Evaluator(model, progress=False)
    calls = {"IG": lambda: [ig.attribute(**b) for b in batches],
             "Chefer": lambda: [chefer.attribute(**b) for b in batches],
             "Evaluator": lambda: [evaluator.evaluate(b, a) for b, a in zip(batches, attributions, strict=True)]}
    print(f"# {'PyHealth' if use_pyhealth else 'fastattr'} Transformer 2L/4H/d64, {args.patients} long-tailed "
          f"patients in batches of {args.batch}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"best of {args.repeats}")
    print("| method | call ms | inside the padding check ms | share | batches trimmed |")
    print("|---|---|---|---|---|")
    for label, run in calls.items():
        spent = [0.0]
        timed_check(*CHECKS[label], spent)
        run()  # warm-up
        best, best_spent = float("inf"), 0.0
        for _ in range(args.repeats):
            spent[0] = 0.0
            start = time.perf_counter()
            run()
            took = time.perf_counter() - start
            if took < best:
                best, best_spent = took, spent[0]
        print(f"| {label} | {best * 1e3:.0f} | {best_spent * 1e3:.0f} | {best_spent / best:.1%} | "
              f"{trimmed[label]} of {len(batches)} |")


if __name__ == "__main__":
    main()
