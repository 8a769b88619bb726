"""Time and memory of the cohort tables against the attribution they read.

    python -m benchmarks.cohort_tables --checkpoint model.pt --size 100000 --out /tmp/run100k

Attributes ``--size`` synthetic patients with a model saved by ``fastattr demo --save-model``
(``fastattr attribute``; skipped when ``--out`` already holds a finished run of that size), then
runs ``summarize``, ``summarize --by-class``, ``export`` to parquet and to CSV and the HTML
report, each in a fresh process that reports its own wall time and peak resident memory
(``ru_maxrss``). Prints a markdown table; the issue's bar is each step faster than the
attribution and under 1 GiB.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

STEP = """
import json, resource, sys, time
start = time.perf_counter()
from fastattr.report import page as report
from fastattr.runs import tables
run = sys.argv[1]
{body}
print(json.dumps({{"s": time.perf_counter() - start,
                  "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

STEPS = {
    "summarize": "tables.summarize(run)",
    "summarize --by-class": "tables.summarize(run, by_class=True)",
    "export parquet": "tables.export(run, run + '/attributions.parquet')",
    "export csv": "tables.export(run, run + '/attributions.csv')",
    "report (one run)": "report.write_report(run, run + '/report.html')",
}


def measure(body: str, run: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", STEP.format(body=body), str(run)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    out = Path(args.out)
    attribute_s = None
    manifest = out / "manifest.json"
    if not (manifest.exists() and json.loads(manifest.read_text()).get("patients") == args.size):
        command = [sys.executable, "-m", "fastattr", "attribute", "--size", str(args.size), "--checkpoint",
                   args.checkpoint, "--out", str(out), "--batch-size", str(args.batch_size)]
        if args.device:
            command += ["--device", args.device]
        start = time.perf_counter()
        subprocess.run(command, check=True)
        attribute_s = time.perf_counter() - start
        (out / "attribute_seconds.json").write_text(json.dumps({"s": attribute_s}))
    else:
        saved = out / "attribute_seconds.json"
        attribute_s = json.loads(saved.read_text())["s"] if saved.exists() else None
    shard_mib = sum(p.stat().st_size for p in out.glob("shard-*.safetensors")) / 2 ** 20
    print(f"run: {args.size} patients, {len(list(out.glob('shard-*.safetensors')))} shards, {shard_mib:.0f} MiB; "
          f"attribution took {attribute_s:.1f} s" if attribute_s else "attribution time unknown")
    print("| step | wall s | share of the attribution time | peak RSS MiB | output MiB |")
    print("|---|---|---|---|---|")
    outputs = {"export parquet": out / "attributions.parquet", "export csv": out / "attributions.csv",
               "report (one run)": out / "report.html"}
    for name, body in STEPS.items():
        got = measure(body, out)
        size = outputs[name].stat().st_size / 2 ** 20 if name in outputs else float("nan")
        share = f"{got['s'] / attribute_s:.1%}" if attribute_s else "-"
        print(f"| {name} | {got['s']:.1f} | {share} | {got['rss_mib']:.0f} | {size:.1f} |", flush=True)


if __name__ == "__main__":
    main()
