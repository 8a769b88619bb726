"""The ``fastattr`` command line."""
from __future__ import annotations

import argparse
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastattr", description="Fast, exact attribution for clinical models.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small Transformer on a synthetic cohort and explain it")
    demo.add_argument("--quick", action="store_true", help="smaller cohort and shorter training (CI, tests)")
    demo.add_argument("--patients", type=int, default=None, help="cohort size (default 2000, quick 1000)")
    demo.add_argument("--updates", type=int, default=None, help="training updates (default 600, quick 300)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--steps", type=int, default=50, help="IG steps")
    demo.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    demo.add_argument("--out", default="fastattr-demo", help="folder for the HTML/PNG pictures and results.json")
    bench = sub.add_parser("bench", help="time fastattr against PyHealth and Captum on this machine")
    bench.add_argument("--quick", action="store_true", help="a small sweep (CI, tests)")
    bench.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when available)")
    bench.add_argument("--out", default="fastattr-bench", help="folder for bench.csv and bench.png")
    bench.add_argument("--lengths", type=int, nargs="+", default=None, help="sequence lengths to sweep")
    for name, help_text in (("steps", "IG steps"), ("batch", "batch size"), ("layers", "Transformer layers"),
                            ("heads", "attention heads"), ("dim", "embedding dim"), ("repeats", "timed repeats")):
        bench.add_argument(f"--{name}", type=int, default=None, help=help_text)
    args = parser.parse_args(argv)
    if args.command == "bench":
        from fastattr import bench as bench_module

        for name in ("steps", "batch", "layers", "heads", "dim", "repeats"):
            value = getattr(args, name)
            if value is not None and value < 1:
                parser.error(f"--{name} must be >= 1; got {value}")
        if args.lengths and min(args.lengths) < 1:
            parser.error("--lengths must all be >= 1")
        bench_module.run(quick=args.quick, device=args.device, out=args.out, lengths=args.lengths, steps=args.steps,
                         batch=args.batch, layers=args.layers, heads=args.heads, dim=args.dim, repeats=args.repeats)
    if args.command == "demo":
        from fastattr import demo as demo_module

        for name in ("patients", "updates", "steps"):
            value = getattr(args, name)
            if value is not None and value < 1:
                parser.error(f"--{name} must be >= 1; got {value}")
        demo_module.run(
            patients=args.patients or (1000 if args.quick else 2000),
            seed=args.seed,
            steps=args.steps,
            updates=args.updates or (300 if args.quick else 600),
            device=args.device,
            out=args.out,
            repeats=1 if args.quick else 3,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
