"""The ``fastattr`` command line."""
from __future__ import annotations

import argparse
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastattr", description="Fast, exact attribution for clinical models.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small Transformer on a synthetic cohort and explain it with IG")
    demo.add_argument("--quick", action="store_true", help="smaller cohort and shorter training (for CI)")
    demo.add_argument("--patients", type=int, default=None, help="cohort size (default 2000, quick 800)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--steps", type=int, default=50, help="IG steps")
    demo.add_argument("--train-seconds", type=float, default=None, help="training time (default 8, quick 3)")
    demo.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from fastattr import demo as demo_module

        demo_module.run(
            patients=args.patients or (800 if args.quick else 2000),
            seed=args.seed,
            steps=args.steps,
            train_seconds=args.train_seconds if args.train_seconds is not None else (3.0 if args.quick else 8.0),
            device=args.device,
            repeats=1 if args.quick else 3,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
