"""What the faster precision modes cost in fidelity, on a trained model: the demo's Transformer on
the demo's synthetic cohort, its held-out patients attributed whole (``attribute_dataset``) with
IG and with Chefer in fp32, tf32 and bf16.

    python -m benchmarks.precision                     # CPU: fp32 and bf16 (tf32 is fp32 there)
    python -m benchmarks.precision --device cuda       # every mode, timed too

Against each method's fp32 run it prints: the largest relative error (the largest absolute
difference of any attribution over the largest fp32 attribution), for IG the convergence delta
``|delta| / |f(x) - f(b)|`` (median and 90th percentile over the patients whose logit moves by at
least ``MIN_GAP`` along the path; fp32's own quadrature error alongside), the
Spearman correlation of cohort code importance (``fastattr summarize``'s importance: mean
|attribution| over patients) and the overlap of the top-10 codes, and each mode's wall time
(side by side in one run; absolute times only mean something on a GPU).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import fastattr
from fastattr.cohort import attribute_dataset, load_attributions
from fastattr.demo.demo import train
from fastattr.demo.models import FeatureProcessor, FeatureSpec, TransformerClassifier, load_checkpoint
from fastattr.demo.synthetic import CohortDataset, SyntheticCohort
from fastattr.report.page import spearman
from fastattr.runs import summaries

# Patients whose prediction barely moves along the path (|f(x) - f(b)| below this, in logits) make
# the ratio meaningless (0/0); they are left out of the delta column, whose count says how many stay.
MIN_GAP = 0.05


def trained_model(args, device: torch.device):
    """The demo's model and cohort: loaded from ``--checkpoint``, or trained as the demo trains it."""
    if args.checkpoint:
        model, extra = load_checkpoint(args.checkpoint, map_location=device)
        cohort = SyntheticCohort(**{**extra.get("cohort", {}), "patients": args.patients})
        return model, cohort
    torch.manual_seed(args.seed)
    cohort = SyntheticCohort(patients=args.patients, seed=args.seed)
    spec = FeatureSpec({"codes": FeatureProcessor(token=True, size=len(cohort.names))}, {"label": "binary"})
    model = TransformerClassifier(spec, num_classes=2, dim=32, heads=2, layers=2).to(device)
    train(model, cohort, list(range(int(0.8 * args.patients))), args.updates, device, args.seed)
    return model.eval(), cohort


def importance(run: Path) -> dict[int, float]:
    summary = summaries.summarize_codes(load_attributions(run))
    return {r["code_id"]: r["importance"] for r in summary.table()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--checkpoint", default=None, help="a model saved by fastattr demo --save-model")
    parser.add_argument("--patients", type=int, default=2000, help="cohort size (the demo's: 2000)")
    parser.add_argument("--updates", type=int, default=600, help="training updates (the demo's: 600)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--modes", nargs="+", default=None, help="default: fp32 bf16 on the CPU, all on CUDA")
    args = parser.parse_args()
    device = torch.device(args.device)
    modes = args.modes or (["fp32", "tf32", "bf16"] if device.type == "cuda" else ["fp32", "bf16"])
    model, cohort = trained_model(args, device)
    held_out = CohortDataset(cohort, range(int(0.8 * len(cohort)), len(cohort)))
    loader = torch.utils.data.DataLoader(held_out, batch_size=64, collate_fn=CohortDataset.collate)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {args.device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}; the demo's "
          f"model (2L/2H/d32, {'loaded' if args.checkpoint else f'trained {args.updates} updates'}), "
          f"{len(held_out)} held-out patients, IG steps {args.steps}")
    with tempfile.TemporaryDirectory() as tmp:
        print("| method | mode | wall s | vs fp32 time | max rel. error | IG delta/gap median, p90 (patients) "
              "| Spearman of code "
              "importance | top-10 overlap |")
        print("|---|---|---|---|---|---|---|---|")
        for method in ("ig", "chefer"):
            interp = fastattr.IntegratedGradients(model, steps=args.steps) if method == "ig" else \
                fastattr.CheferRelevance(model)
            kwargs = {"return_convergence_delta": True} if method == "ig" else {}
            runs, seconds = {}, {}
            for mode in modes:
                runs[mode] = Path(tmp) / f"{method}-{mode}"
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                attribute_dataset(interp, loader, runs[mode], progress=False, precision=mode, **kwargs)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds[mode] = time.perf_counter() - start
            ref = load_attributions(runs["fp32"]).all()
            ref_importance = importance(runs["fp32"])
            top_ref = sorted(ref_importance, key=ref_importance.get, reverse=True)[:10]
            for mode in modes:
                got = load_attributions(runs[mode]).all()
                a, b = got["attr/codes"].double(), ref["attr/codes"].double()
                err = float((a - b).abs().max() / b.abs().max())
                delta = "n/a"
                if method == "ig":  # f(x) - f(b) = sum(attributions) - delta
                    d = got["convergence_delta"].double()
                    gap = (got["attr/codes"].double().sum(1) - d).abs()
                    ratio = (d.abs() / gap)[gap >= MIN_GAP].numpy()
                    delta = f"{np.median(ratio):.2e}, {np.quantile(ratio, 0.9):.2e} ({len(ratio)})"
                imp = importance(runs[mode])
                common = sorted(set(imp) & set(ref_importance))
                rho = spearman(np.array([imp[c] for c in common]), np.array([ref_importance[c] for c in common]))
                top = sorted(imp, key=imp.get, reverse=True)[:10]
                print(f"| {method} | {mode} | {seconds[mode]:.2f} | {seconds['fp32'] / seconds[mode]:.2f}x | "
                      f"{err:.2e} | {delta} | {rho:.4f} | {len(set(top) & set(top_ref))} of 10 |", flush=True)


if __name__ == "__main__":
    main()
