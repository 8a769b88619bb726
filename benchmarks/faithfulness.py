"""Faithfulness evaluation (comprehensiveness + sufficiency) against PyHealth's Evaluator.

    python -m benchmarks.faithfulness                    # both tables, 256 long-tailed patients
    python -m benchmarks.faithfulness --patients 64 --repeats 1 --steps 5   # a quick look

Run it with the PyHealth environment's python: the baseline is PyHealth 2.1.0's own
``pyhealth.metrics.interpretability.Evaluator`` on its Transformer (log-normal lengths, median 15,
cap 400, ``get_dataloader(batch_size=32)``). Two tables, each a ratio side by side in one run:
``evaluate`` alone over every batch with the same attributions (binary model with the default
filter, and a 3-class model), and ``evaluate_attribution`` end to end (PyHealth's interpreter and
Evaluator against fastattr's). Every fastattr number is checked against PyHealth's before timing.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import platform

import torch

import fastattr
import fastattr.metrics
from benchmarks.timing import table
from fastattr.demo.bench import cohort_loaders, pyhealth_available
from fastattr.demo.timing import time_interleaved


def _quiet(fn):
    """``fn`` with PyHealth's per-batch prints swallowed (they go to a terminal in real use)."""
    def run():
        with contextlib.redirect_stdout(io.StringIO()):
            return fn()
    return run


def evaluator_rows(args, classes: int) -> None:
    from pyhealth.metrics.interpretability import Evaluator

    model, _, loader = cohort_loaders(args.patients, 15, 400, args.layers, args.heads, args.dim, "cpu", True,
                                      seed=args.seed, classes=classes)
    batches = list(loader(32))
    chefer = fastattr.CheferRelevance(model)
    attributions = [chefer.attribute(**b) for b in batches]
    theirs, ours = _quiet(lambda: Evaluator(model))(), fastattr.metrics.Evaluator(model)
    rows = valid = total = 0
    for batch, attr in zip(batches, attributions, strict=False):
        ref = _quiet(lambda: theirs.evaluate(batch, attr, return_per_percentage=True))()
        got = ours.evaluate(batch, attr, return_per_percentage=True)
        for metric in ref:
            for p in ref[metric]:
                assert (got[metric][p] - ref[metric][p]).abs().max() <= 1e-6, (metric, p)
        rows += ours.metrics["comprehensiveness"].scorer.last_rows
        valid += int(ours.evaluate(batch, attr)["comprehensiveness"][1].sum())
        total += len(attr["codes"])
    kind = "binary, default filter" if classes == 2 else f"{classes}-class"
    print(f"\n### Evaluator.evaluate alone, {kind}: {total} patients in {len(batches)} batches, {valid} scored; "
          f"ablated rows run {rows} of PyHealth's {10 * total} (checked equal to PyHealth, <= 1e-6)")
    fns = {"pyhealth Evaluator": _quiet(lambda: [theirs.evaluate(b, a) for b, a in zip(batches, attributions,
                                                                                       strict=False)]),
           "fastattr.metrics.Evaluator": lambda: [ours.evaluate(b, a) for b, a in zip(batches, attributions,
                                                                                      strict=False)]}
    table(time_interleaved(fns, args.repeats, "cpu"), "pyhealth Evaluator")


def end_to_end_rows(args) -> None:
    from pyhealth.interpret import methods
    from pyhealth.metrics.interpretability import Evaluator

    model, _, loader = cohort_loaders(args.patients, 15, 400, args.layers, args.heads, args.dim, "cpu", True,
                                      seed=args.seed)
    data = loader(32)
    for name, theirs_method, ours_method in (
            ("Chefer", methods.CheferRelevance(model), fastattr.CheferRelevance(model)),
            (f"IG steps {args.steps}", methods.IntegratedGradients(model, steps=args.steps),
             fastattr.IntegratedGradients(model, steps=args.steps))):
        theirs = _quiet(lambda: Evaluator(model))()
        ours = fastattr.metrics.Evaluator(model, progress=False)
        baseline = _quiet(lambda: theirs.evaluate_attribution(data, theirs_method))
        fast = lambda: ours.evaluate_attribution(data, ours_method)  # noqa: E731
        ref, got, mixed = baseline(), fast(), ours.evaluate_attribution(data, theirs_method)
        for metric in ref:
            assert abs(mixed[metric] - ref[metric]) <= 1e-6, (name, metric, mixed[metric], ref[metric])
        worst = max(abs(got[m] - ref[m]) for m in ref)
        print(f"\n### evaluate_attribution end to end, {name}: PyHealth {_fmt(ref)}; fastattr {_fmt(got)} (largest "
              f"difference {worst:.1e}: the interpreters' attributions agree to float rounding, and a near-tie at a "
              f"quantile can move one position); fastattr's Evaluator on PyHealth's interpreter equals PyHealth's "
              "to 1e-6")
        table(time_interleaved({"pyhealth interpreter + Evaluator": baseline,
                                "fastattr interpreter + fastattr.metrics.Evaluator": fast}, args.repeats, "cpu"),
              "pyhealth interpreter + Evaluator")


def _fmt(result: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.6f}" for k, v in result.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["evaluator", "end-to-end"], default=None)
    args = parser.parse_args()
    if not pyhealth_available():
        raise SystemExit("this benchmark compares against PyHealth 2.1.0: run it with the PyHealth environment's "
                         "python (bash tests/pyhealth_env.sh prints its path)")
    print(f"device cpu ({platform.processor() or 'cpu'}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, "
          f"PyHealth Transformer {args.layers}L/{args.heads}H/d{args.dim}, {args.patients} long-tailed patients "
          "(median 15 codes, cap 400), get_dataloader(batch_size=32)")
    if args.only != "end-to-end":
        for classes in (2, 3):
            evaluator_rows(args, classes)
    if args.only != "evaluator":
        end_to_end_rows(args)


if __name__ == "__main__":
    main()
