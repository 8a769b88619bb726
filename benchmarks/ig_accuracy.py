"""How accurate is each integrated-gradients rule, and what does it cost: the table behind
``steps="auto"``.

    python -m benchmarks.ig_accuracy                  # the demo's model and, where importable, PyHealth's
    python -m benchmarks.ig_accuracy --models demo --repeats 1     # a quick look
    python -m benchmarks.ig_accuracy --threads 1      # the algorithmic ratios (no small-op thread stalls)

For each rule (PyHealth's uniform average, the trapezoid, Gauss-Legendre, ``steps="auto"``) at
several step counts: each patient's relative L2 error of its whole attribution against a converged
reference (Gauss-Legendre, 256 nodes), median and worst over the patients, mean path points per
patient, and the wall time of attributing every batch (median of interleaved repeats in one run).
Models: the demo's Transformer trained as ``fastattr demo`` trains it (128 long-tailed synthetic
patients, log-normal lengths median 15, cap 256, batches of 32 padded to their longest), and
PyHealth 2.1.0's Transformer (2 layers, d64, 64 long-tailed patients, ``get_dataloader(batch_size=32)``;
run with the PyHealth environment's python). The last lines check the targets of ``steps="auto"``
with its default tolerance: every patient <= 1e-2, the median <= 2e-3, at >= 2x the speed of
fastattr's own ``steps=50`` on the same batches.
"""
from __future__ import annotations

import argparse
import platform
import warnings

import torch

import fastattr
from fastattr.demo.bench import cohort_loaders, pyhealth_available
from fastattr.demo.timing import time_interleaved

RULES = [("uniform", 5), ("uniform", 50), ("uniform", 200), ("riemann_trapezoid", 16), ("riemann_trapezoid", 32),
         ("riemann_trapezoid", 64), ("gausslegendre", 8), ("gausslegendre", 16), ("gausslegendre", 32),
         ("gausslegendre", 64), ("auto", 1e-2), ("auto", None), ("auto", 2e-3), ("auto", 1e-3)]
REFERENCE = ("gausslegendre", 256)


def demo_model(patients: int, seed: int, device: str = "cpu"):
    """The demo's Transformer, trained as ``fastattr demo`` trains it, and long-tailed batches of 32."""
    from fastattr.demo.demo import _trained
    from fastattr.demo.synthetic import SyntheticCohort

    torch.manual_seed(0)
    cohort = SyntheticCohort(patients=2000, seed=0)
    model, _ = _trained(cohort, 1600, 600, torch.device(device), 0, None)
    tail = SyntheticCohort(patients=patients, seed=seed, vocab=cohort.vocab, lengths="lognormal", median_codes=15,
                           longest=256)
    batches = [{"codes": tail.batch(range(s, min(s + 32, patients)), pad_to_longest=True)["codes"].to(device)}
               for s in range(0, patients, 32)]
    return model.eval(), batches


def pyhealth_model(patients: int, seed: int):
    model, _, loader = cohort_loaders(patients, 15, 256, 2, 2, 64, "cpu", True, seed=seed)
    return model, [{k: v for k, v in b.items() if k in model.feature_keys} for b in loader(32)]


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu"


def call(ig: fastattr.IntegratedGradients, rule: tuple[str, float | int | None]) -> dict:
    method, value = rule
    if method == "auto":
        return {"steps": "auto", "tolerance": value}
    return {"steps": value, "method": method}


def attribute_all(ig, batches, rule) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every patient's attribution (all features flattened together) and its path points."""
    rows, points = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for batch in batches:
            out = ig.attribute(**call(ig, rule), **batch)
            flat = torch.cat([v.reshape(v.shape[0], -1).double() for _, v in sorted(out.items())], dim=1)
            rows += list(flat)
            points.append(ig.last_steps)
    return rows, torch.cat(points)


def label(rule) -> str:
    method, value = rule
    if method == "auto":
        return f"auto, tolerance {value:g}" if value is not None else "auto, default tolerance (5e-3)"
    name = {"uniform": "PyHealth's uniform", "riemann_trapezoid": "trapezoid", "gausslegendre": "Gauss-Legendre"}
    return f"{name[method]}, steps {value}"


def measure(name: str, model, batches, repeats: int, device: str = "cpu") -> None:
    ig = fastattr.IntegratedGradients(model)
    reference, _ = attribute_all(ig, batches, REFERENCE)
    patients = len(reference)
    results = {}
    for rule in RULES:
        rows, points = attribute_all(ig, batches, rule)
        errors = torch.tensor([float((r - ref).norm() / ref.norm().clamp_min(1e-30))
                               for r, ref in zip(rows, reference, strict=True)])
        results[rule] = (errors, points.double().mean().item())
    timing = time_interleaved({rule: (lambda rule=rule: attribute_all(ig, batches, rule)) for rule in RULES},
                              repeats, device)
    print(f"\n### {name}: {patients} patients in {len(batches)} batches; reference Gauss-Legendre 256 nodes; "
          f"torch {torch.__version__}, {_device_name(device)}, threads {torch.get_num_threads()}, "
          f"median of {repeats} interleaved\n")
    base = timing[("uniform", 50)]["median_ms"]
    print("| rule | points per patient | median error | worst patient | wall s | speed vs steps 50 |")
    print("|---|---|---|---|---|---|")
    for rule in RULES:
        errors, points = results[rule]
        ms = timing[rule]["median_ms"]
        print(f"| {label(rule)} | {points:.1f} | {errors.median():.1e} | {errors.max():.1e} | {ms / 1e3:.2f} | "
              f"{base / ms:.2f}x |")
    errors, _ = results[("auto", None)]
    speed = base / timing[("auto", None)]["median_ms"]
    met = errors.max() <= 1e-2 and errors.median() <= 2e-3 and speed >= 2.0
    print(f"\nsteps='auto' (default tolerance): worst {errors.max():.1e} (target <= 1e-2), "
          f"median {errors.median():.1e} (<= 2e-3), {speed:.2f}x steps=50 (>= 2x): "
          f"{'targets met' if met else 'TARGETS NOT MET'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["demo", "pyhealth"], choices=["demo", "pyhealth"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (PyHealth's model runs on the CPU only here)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (CPU; 1 shows the algorithmic ratio)")
    args = parser.parse_args()
    # The demo's model is trained with torch's default threads whatever --threads says: training's
    # float rounding depends on the thread count, and a differently trained model has other paths.
    demo = demo_model(128, args.seed, args.device) if "demo" in args.models else None
    if args.threads:
        torch.set_num_threads(args.threads)
    if demo is not None:
        measure("the demo's Transformer (trained, 2 layers, d32)", *demo, args.repeats, args.device)
    if "pyhealth" in args.models:
        if pyhealth_available():
            measure("PyHealth 2.1.0 Transformer (2 layers, 2 heads, d64, untrained)", *pyhealth_model(64, args.seed),
                    args.repeats)
        else:
            print("\n### PyHealth Transformer: not measured (PyHealth is not importable; run with the PyHealth "
                  "environment's python)")


if __name__ == "__main__":
    main()
