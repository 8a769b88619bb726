"""fastattr.ShapExplainer / LimeExplainer against PyHealth 2.1.0's classes, side by side in one run, on
the workload of issue 33: PyHealth's Transformer as its interpretability example builds it (3 layers,
4 heads, d128), a long-tailed two-feature cohort (conditions 3-40 codes, procedures 1-12), batches of 16,
PyHealth's defaults (SHAP: 1,000 coalitions; LIME: the example's ``n_samples=200``). Every batch's
attributions are first checked equal (relative error per key); then both are timed interleaved, with the
floor beside them: fastattr's row runner alone over the same distinct rows in the same length groups (the
model's no-grad forwards the method needs; no draws, checks, weights or fit).

Run in the PyHealth environment:
``$(bash tests/pyhealth_env.sh)/bin/python -P benchmarks/perturbation_compare.py --method lime``.
"""
from __future__ import annotations

import argparse
import random
import time

import torch

import fastattr


def cohort(patients: int, seed: int) -> list[dict]:
    rng = random.Random(seed)

    def long_tailed(lo: int, hi: int) -> int:
        return min(hi, lo + int(rng.lognormvariate(1.6, 0.8)))

    return [{"patient_id": f"p{i}", "visit_id": "v", "label": i % 2,
             "conditions": [f"c{rng.randrange(300)}" for _ in range(long_tailed(3, 40))],
             "procedures": [f"p{rng.randrange(100)}" for _ in range(long_tailed(1, 12))]} for i in range(patients)]


def build(patients: int, batch: int, seed: int):
    from pyhealth.datasets import create_sample_dataset, get_dataloader
    from pyhealth.models import Transformer

    dataset = create_sample_dataset(samples=cohort(patients, seed), output_schema={"label": "binary"},
                                    input_schema={"conditions": "sequence", "procedures": "sequence"},
                                    dataset_name=f"perturbation-{seed}")
    torch.manual_seed(seed)
    model = Transformer(dataset=dataset, embedding_dim=128, heads=4, dropout=0.3, num_layers=3).eval()
    return model, list(get_dataloader(dataset, batch_size=batch, shuffle=False))


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def method_draws(ours, features, batch: dict) -> dict[str, torch.Tensor]:
    """The draws per key ``[N, n_key]`` the method makes for this batch (its seed, its order)."""
    from fastattr.interpret.perturbation.engine import feature_counts

    counts = feature_counts(features)
    if isinstance(ours, fastattr.LimeExplainer):
        return ours._perturbations([k for k in batch if k in counts], counts, torch.device("cpu"))
    keys = sorted(counts)
    coalitions = ours._coalitions(sum(counts.values()), torch.device("cpu"))
    return dict(zip(keys, coalitions.split([counts[k] for k in keys], dim=1), strict=True))


def floor_seconds(ours, batches: list[dict]) -> float:
    """The row runner alone over each batch's distinct rows, in the groups the planner picks."""
    from fastattr.interpret.features import FeatureBatch
    from fastattr.interpret.perturbation.engine import gated_rows, present_positions
    from fastattr.interpret.perturbation.inputs import perturbation_baselines

    total = 0.0
    for batch in batches:
        features = FeatureBatch.from_batch(ours.model, batch)
        targets = torch.zeros(features.size, dtype=torch.long)
        rows = gated_rows(method_draws(ours, features, batch), present_positions(features), features.size)
        baselines = perturbation_baselines(None, features, torch.device("cpu"))
        start = time.perf_counter()
        ours.runner.row_logits(features, baselines, rows, targets, pack="auto")
        total += time.perf_counter() - start
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=48)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--method", choices=["shap", "lime"], default="shap")
    parser.add_argument("--coalitions", type=int, default=1000, help="SHAP's max_coalitions")
    parser.add_argument("--samples", type=int, default=200, help="LIME's n_samples (PyHealth's example: 200)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from pyhealth.interpret import methods

    model, batches = build(args.patients, args.batch, seed=0)
    if args.method == "shap":
        theirs = methods.ShapExplainer(model, use_embeddings=True, max_coalitions=args.coalitions)
        ours = fastattr.ShapExplainer(model, use_embeddings=True, max_coalitions=args.coalitions)
        draws = f"{args.coalitions} coalitions"
    else:
        theirs = methods.LimeExplainer(model, use_embeddings=True, n_samples=args.samples)
        ours = fastattr.LimeExplainer(model, use_embeddings=True, n_samples=args.samples)
        draws = f"{args.samples} perturbations"
    times = {"pyhealth": [], "fastattr": [], "floor": []}
    worst, rows = 0.0, 0
    for repeat in range(args.repeats):
        for name, method in (("pyhealth", theirs), ("fastattr", ours)):
            start = time.perf_counter()
            out = [method.attribute(**b) for b in batches]
            times[name].append(time.perf_counter() - start)
            if name == "fastattr":
                rows += ours.runner.last_rows if repeat == 0 else 0
            if repeat == 0:
                results = out if name == "pyhealth" else results
                if name == "fastattr":
                    worst = max(relative_error(o[k], r[k]) for o, r in zip(out, results, strict=True) for k in r)
        times["floor"].append(floor_seconds(ours, batches))
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    lengths = [int((b["conditions"] != 0).sum() + (b["procedures"] != 0).sum()) for b in batches]
    padded = [b["conditions"].numel() + b["procedures"].numel() for b in batches]
    print(f"{args.method}: {args.patients} patients, batches of {args.batch}, {draws}, "
          f"{1 - sum(lengths) / sum(padded):.0%} padding, threads {torch.get_num_threads()}; "
          f"worst relative error vs PyHealth {worst:.2e}")
    print("| | seconds (median of %d) | speed vs PyHealth |" % args.repeats)
    print("|---|---|---|")
    for name in ("pyhealth", "fastattr", "floor"):
        print(f"| {name} | {med[name]:.2f} | {med['pyhealth'] / med[name]:.2f}x |")
    print(f"fastattr's share of the floor's speed: {med['floor'] / med['fastattr']:.0%}")


if __name__ == "__main__":
    main()
