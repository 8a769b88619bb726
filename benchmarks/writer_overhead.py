"""What the cohort writer itself costs: ``attribute_dataset`` with an interpreter that does no work
(random attributions), so the time is the shards, checksums, journal and manifest alone.

    python -m benchmarks.writer_overhead --patients 100000 --batch 64

Prints the total and the mean time per shard over the first, middle and last 200 shards (from
the shard files' modification times): flat per-shard times mean listing a shard does not grow
with the run.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from fastattr.cohort import attribute_dataset
from fastattr.demo.models import FeatureProcessor, FeatureSpec, TransformerClassifier


class NoWork:
    """An interpreter that returns random attributions and predictions at once."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def attribute(self, **batch):
        codes = batch["codes"]
        self.last_predictions = (torch.rand(len(codes), 1), torch.zeros(len(codes), dtype=torch.long))
        return {"codes": torch.rand(codes.shape)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--codes", type=int, default=30)
    args = parser.parse_args()
    spec = FeatureSpec({"codes": FeatureProcessor(token=True, size=300)}, {"label": "binary"})
    model = TransformerClassifier(spec, num_classes=2, dim=8, heads=1, layers=1).eval()
    g = torch.Generator().manual_seed(0)
    batches = [{"codes": torch.randint(0, 300, (args.batch, args.codes), generator=g),
                "patient_id": [f"P{i * args.batch + j:08d}" for j in range(args.batch)]}
               for i in range(args.patients // args.batch)]
    out = Path(tempfile.mkdtemp(prefix="fastattr-writer-"))
    try:
        start = time.perf_counter()
        attribute_dataset(NoWork(model), batches, out, progress=False)
        total = time.perf_counter() - start
        stamps = sorted(p.stat().st_mtime for p in out.glob("shard-*.safetensors"))
        n = len(stamps)
        print(f"{args.patients} patients, {n} shards: writer total {total:.2f} s")
        for a in (0, n // 2 - 100, n - 201):
            if 0 <= a and a + 200 < n:
                print(f"  shards {a}-{a + 200}: {(stamps[a + 200] - stamps[a]) / 200 * 1e3:.2f} ms per shard")
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
