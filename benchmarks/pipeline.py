"""Does the cohort runner keep the device busy? ``attribute_dataset`` over the demo's cohort (read,
collated, moved, attributed, written as shards) against ``attribute()`` alone over the same
batches already collated and on the device, in patients per second, with the share of the run's
wall time spent inside the interpreter (``run.json``'s timing).

    python -m benchmarks.pipeline --checkpoint model.pt --size 100000 --device cuda
    python -m benchmarks.pipeline --size 2000 --device cpu          # trains a quick demo model first

The two are timed one after the other in the same process (the second finds warm caches: the
ratio is a lower bound on what the pipeline costs).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import fastattr
from fastattr.cohort import LengthSortedBatches, attribute_dataset
from fastattr.demo.demo import train
from fastattr.demo.models import FeatureProcessor, FeatureSpec, TransformerClassifier, load_checkpoint
from fastattr.demo.synthetic import CohortDataset, SyntheticCohort


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="a model saved by fastattr demo --save-model")
    parser.add_argument("--size", type=int, default=100000)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--method", choices=["ig", "chefer"], default="ig")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.checkpoint:
        model, extra = load_checkpoint(args.checkpoint, map_location=device)
        cohort = SyntheticCohort(**{**extra.get("cohort", {}), "patients": args.size})
    else:
        torch.manual_seed(0)
        cohort = SyntheticCohort(patients=args.size, seed=0)
        spec = FeatureSpec({"codes": FeatureProcessor(token=True, size=len(cohort.names))}, {"label": "binary"})
        model = TransformerClassifier(spec, num_classes=2, dim=32, heads=2, layers=2).to(device)
        train(model, cohort, list(range(min(args.size, 1600))), 300, device, 0)
    model.eval()
    interp = fastattr.IntegratedGradients(model, steps=args.steps) if args.method == "ig" else \
        fastattr.CheferRelevance(model)
    dataset = CohortDataset(cohort)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, collate_fn=CohortDataset.collate)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {args.device} ({name}), torch {torch.__version__}; {args.method}, {args.size} demo patients, "
          f"batches of {args.batch_size}" + (f", steps {args.steps}" if args.method == "ig" else ""))
    with tempfile.TemporaryDirectory() as tmp:
        _sync(device)
        start = time.perf_counter()
        attribute_dataset(interp, loader, tmp, progress=False)
        _sync(device)
        whole = time.perf_counter() - start
        timing = json.loads((Path(tmp) / "run.json").read_text())["timing"]
    batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
               for b in LengthSortedBatches(dataset, model, batch_size=args.batch_size,
                                            collate_fn=CohortDataset.collate)]
    _sync(device)
    start = time.perf_counter()
    for b in batches:
        interp.attribute(**b)
    _sync(device)
    alone = time.perf_counter() - start
    print("| what | wall s | patients/s |\n|---|---|---|")
    print(f"| attribute_dataset (read, collate, move, attribute, write shards) | {whole:.1f} | "
          f"{args.size / whole:.0f} |")
    print(f"| attribute() alone, same sorted batches already on the device | {alone:.1f} | {args.size / alone:.0f} |")
    print(f"attribute_dataset runs at {alone / whole:.0%} of attribute() alone; inside the interpreter for "
          f"{timing['attributing_s'] / timing['wall_s']:.0%} of its wall time")


if __name__ == "__main__":
    main()
