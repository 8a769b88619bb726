"""PyHealth's whole method comparison, side by side in one run: the nine interpreters of PyHealth's
interpretability example (``examples/interpretability/mp_transformer_mimic4_interpret.py``: RandomBaseline,
IntegratedGradients, IntegratedGradientGIM, DeepLift, GIM, CheferRelevance, AttentionRollout,
ShapExplainer, ``LimeExplainer(n_samples=200)``), each run through ``evaluate_attribution(model, loader,
method, metrics=["comprehensiveness", "sufficiency"], percentages=[25, 50, 99])``: once with PyHealth
2.1.0's classes and evaluator, once with fastattr's, on PyHealth's Transformer as the example builds it
(3 layers, 4 heads, d128) over a long-tailed two-feature cohort in batches of 16
(``benchmarks/perturbation_compare.py``'s). Every metric is first checked equal (absolute difference);
the torch global generator is seeded the same before each side (RandomBaseline draws from it).

Run in the PyHealth environment:
``$(bash tests/pyhealth_env.sh)/bin/python -P benchmarks/method_comparison.py``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perturbation_compare import build  # noqa: E402  (the same cohort and model)

import fastattr  # noqa: E402

METHODS = {  # the example's dict: name -> (class name, constructor options)
    "random": ("RandomBaseline", {}),
    "ig": ("IntegratedGradients", {"use_embeddings": True}),
    "ig_gim": ("IntegratedGradientGIM", {}),
    "deeplift": ("DeepLift", {"use_embeddings": True}),
    "gim": ("GIM", {}),
    "chefer": ("CheferRelevance", {}),
    "rollout": ("AttentionRollout", {}),
    "shap": ("ShapExplainer", {"use_embeddings": True}),
    "lime": ("LimeExplainer", {"use_embeddings": True, "n_samples": 200}),
}
METRICS, PERCENTAGES = ["comprehensiveness", "sufficiency"], [25, 50, 99]


def evaluate(evaluate_attribution, model, batches: list[dict], method) -> tuple[dict, float]:
    """One side's metrics and seconds (attribution and evaluation), the global generator seeded first."""
    torch.manual_seed(0)
    start = time.perf_counter()
    result = evaluate_attribution(model, batches, method, metrics=METRICS, percentages=PERCENTAGES)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=48)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of " + ", ".join(METHODS))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from pyhealth.interpret import methods as pyhealth_methods
    from pyhealth.metrics.interpretability import evaluate_attribution as pyhealth_evaluate

    model, batches = build(args.patients, args.batch, seed=0)
    chosen = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(chosen) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    print(f"{args.patients} patients, batches of {args.batch}, PyHealth Transformer 3L/4H/d128, threads "
          f"{torch.get_num_threads()}\n| method | PyHealth s | fastattr s | speedup | comprehensiveness (PyHealth / "
          "fastattr) | sufficiency (PyHealth / fastattr) | max abs. diff |\n|---|---|---|---|---|---|---|")
    totals = [0.0, 0.0]
    for name in chosen:
        cls, options = METHODS[name]
        theirs, t_theirs = evaluate(pyhealth_evaluate, model, batches, getattr(pyhealth_methods, cls)(model, **options))
        ours, t_ours = evaluate(fastattr.evaluate_attribution, model, batches, getattr(fastattr, cls)(model, **options))
        diff = max(abs(theirs[m] - ours[m]) for m in METRICS)
        totals[0] += t_theirs
        totals[1] += t_ours
        cells = [f"{theirs[m]:.4f} / {ours[m]:.4f}" for m in METRICS]
        print(f"| {name} | {t_theirs:.2f} | {t_ours:.2f} | {t_theirs / t_ours:.2f}x | {cells[0]} | {cells[1]} | "
              f"{diff:.1e} |", flush=True)
    print(f"| **all {len(chosen)}** | {totals[0]:.2f} | {totals[1]:.2f} | {totals[0] / totals[1]:.2f}x | | | |")


if __name__ == "__main__":
    main()
