"""The ``fastattr`` command line."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any


def build_parser() -> argparse.ArgumentParser:
    """The ``fastattr`` command line: one parser builder per command."""
    parser = argparse.ArgumentParser(prog="fastattr", description="Fast, exact attribution for clinical models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_demo, _add_attribute, _add_evaluate, _add_tables, _add_bench):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"bench": run_bench, "attribute": _checked_attribute, "evaluate": run_evaluate, "demo": run_demo,
                "export": run_tables, "summarize": run_tables, "report": run_tables}
    return handlers[args.command](parser, args)


def _add_demo(sub: Any) -> None:
    demo = sub.add_parser("demo", help="train a small Transformer on a synthetic cohort and explain it")
    demo.add_argument("--quick", action="store_true", help="smaller cohort and shorter training (CI, tests)")
    demo.add_argument("--patients", type=int, default=None, help="cohort size (default 2000, quick 1000)")
    demo.add_argument("--updates", type=int, default=None, help="training updates (default 600, quick 300)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--steps", type=int, default=50, help="IG steps")
    demo.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    demo.add_argument("--out", default="fastattr-demo", help="folder for the HTML/PNG pictures and results.json")
    demo.add_argument("--save-model", default=None, help="also save the trained model here (for fastattr attribute)")


def _add_attribute(sub: Any) -> None:
    attribute = sub.add_parser("attribute", help="attribute a whole cohort with a saved fastattr model, to shards "
                               "(resumable; run under torchrun to spread it over processes)")
    attribute.add_argument("--cohort", choices=["synthetic"], default="synthetic", help="the embedded cohort generator")
    attribute.add_argument("--size", type=int, required=True, help="patients in the cohort")
    attribute.add_argument("--checkpoint", required=True, help="a model saved by fastattr demo --save-model")
    attribute.add_argument("--method", choices=list(METHOD_NAMES), default="ig",
                           help="the interpreter (fastattr's drop-in for PyHealth's of that name; default ig)")
    attribute.add_argument("--out", required=True, help="output folder (shards and manifest.json)")
    attribute.add_argument("--seed", type=int, default=None, help="cohort seed (default: the model's training cohort)")
    attribute.add_argument("--batch-size", type=int, default=64, help="patients per batch")
    attribute.add_argument("--sort-by-length", action=argparse.BooleanOptionalAction, default=True,
                           help="batch patients of similar length together, each batch padded to its own longest "
                           "(default; --no-sort-by-length keeps the cohort's order)")
    attribute.add_argument("--batch-tokens", type=int, default=None,
                           help="padded codes per sorted batch instead of --batch-size patients")
    attribute.add_argument("--steps", type=_steps, default=None,
                           help="ig, ig-gim: path steps (default 50), or 'auto': each patient's path refined to "
                           "--tolerance")
    attribute.add_argument("--tolerance", type=float, default=None,
                           help="relative tolerance of --steps auto (default 5e-3; README: what each costs)")
    attribute.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default=None,
                           help="ig, chefer, ig-gim: the model's arithmetic: fp32 (default, exact), tf32 or bf16 "
                           "(faster on GPUs; fastattr's sums stay fp32; the README states what each costs)")
    attribute.add_argument("--coalitions", type=int, default=None, help="shap: max_coalitions (default 1000)")
    attribute.add_argument("--samples", type=int, default=None, help="lime: n_samples (default 1000)")
    attribute.add_argument("--random-seed", type=int, default=None,
                           help="shap, lime (default 42), random (default: unseeded): the method's random_seed")
    attribute.add_argument("--temperature", type=float, default=None, help="gim, ig-gim: the softmax temperature "
                           "of GIM's backward rule (default 2)")
    attribute.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when available)")
    attribute.add_argument("--no-resume", action="store_true", help="refuse to continue a run found in --out")


def _add_evaluate(sub: Any) -> None:
    evaluate = sub.add_parser("evaluate", help="score every patient of a run for faithfulness (comprehensiveness, "
                              "sufficiency, per-percentage drops, a random baseline) into RUN/faithfulness")
    evaluate.add_argument("run", help="a run folder written by fastattr attribute / attribute_dataset")
    evaluate.add_argument("--checkpoint", required=True, help="the model the run explains (fastattr demo --save-model)")
    evaluate.add_argument("--percentages", type=float, nargs="+", default=None,
                          help="percentages of each patient's attributions removed or kept (default 1 5 10 20 50)")
    evaluate.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when available)")
    evaluate.add_argument("--no-resume", action="store_true",
                          help="refuse to continue scores found in RUN/faithfulness")


def _add_tables(sub: Any) -> None:
    export = sub.add_parser("export", help="write a run's attributions as one long table (a row per sample, feature "
                            "and position, codes decoded), streamed to parquet or CSV")
    export.add_argument("run", help="a run folder written by fastattr attribute / attribute_dataset")
    export.add_argument("--format", choices=["parquet", "csv"], default=None,
                        help="default: from --output's suffix, else parquet")
    export.add_argument("--output", default=None, help="file to write (default: RUN/attributions.<format>)")
    summarize = sub.add_parser("summarize", help="per-code statistics over a whole run, in one pass over its shards")
    summarize.add_argument("run", help="a run folder")
    summarize.add_argument("--by-class", action="store_true", help="one row per code and class")
    summarize.add_argument("--top", type=int, default=20, help="rows to print (default 20)")
    summarize.add_argument("--output", default=None, help="also write the whole table (.csv or .parquet)")
    report = sub.add_parser("report", help="a self-contained HTML report of one run, or of several runs of one "
                            "cohort (IG, Chefer, SHAP...) with their method comparison")
    report.add_argument("runs", nargs="+", help="run folders: one, or several methods' runs of one cohort")
    report.add_argument("--output", default=None, help="HTML file (default: report.html in the first run's folder)")
    report.add_argument("--top", type=int, default=20, help="codes in the top lists (default 20)")
    report.add_argument("--patients", type=int, default=6, help="heat maps of the highest-probability samples")


def _add_bench(sub: Any) -> None:
    bench = sub.add_parser("bench", help="time fastattr against PyHealth and Captum on this machine")
    bench.add_argument("--quick", action="store_true", help="a small sweep (CI, tests)")
    bench.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when available)")
    bench.add_argument("--out", default="fastattr-bench", help="folder for bench.csv and bench.png")
    bench.add_argument("--lengths", type=int, nargs="+", default=None, help="sequence lengths to sweep")
    bench.add_argument("--no-long-tail", action="store_true",
                       help="skip the long-tailed workload (32 patients, log-normal lengths, padded to the longest)")
    bench.add_argument("--no-user-calls", action="store_true",
                       help="skip both methods as users call them (batch-1 loop, batch-32 loop, attribute_dataset)")
    for name, help_text in (("steps", "IG steps"), ("batch", "batch size"), ("layers", "Transformer layers"),
                            ("heads", "attention heads"), ("dim", "embedding dim"), ("repeats", "timed repeats")):
        bench.add_argument(f"--{name}", type=int, default=None, help=help_text)


def run_bench(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from fastattr.demo import bench as bench_module

    for name in ("steps", "batch", "layers", "heads", "dim", "repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1; got {value}")
    if args.lengths and min(args.lengths) < 1:
        parser.error("--lengths must all be >= 1")
    bench_module.run(quick=args.quick, device=args.device, out=args.out, lengths=args.lengths, steps=args.steps,
                     batch=args.batch, layers=args.layers, heads=args.heads, dim=args.dim, repeats=args.repeats,
                     long_tail=not args.no_long_tail, user_calls=not args.no_user_calls)
    return 0


def _steps(text: str) -> int | str:
    """``--steps``: an integer, or ``auto``."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer or 'auto'; got {text!r}") from None


# ``fastattr attribute``'s method options: the flag's attribute in the parsed arguments -> the keyword
# of the method's constructor or call (fastattr.cohort.methods.METHODS says which method takes which)
METHOD_FLAGS = {"steps": "steps", "tolerance": "tolerance", "precision": "precision", "coalitions": "max_coalitions",
                "samples": "n_samples", "random_seed": "random_seed", "temperature": "temperature"}
METHOD_NAMES = ("ig", "chefer", "shap", "lime", "deeplift", "rollout", "random", "gim", "ig-gim")


def _method_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """The method options given, as the method's keywords; a flag the method does not take is refused."""
    from fastattr.cohort.methods import METHODS

    spec = METHODS[args.method]
    takes = spec.options + spec.call_options
    given = {flag: keyword for flag, keyword in METHOD_FLAGS.items() if getattr(args, flag) is not None}
    for flag, keyword in given.items():
        if keyword not in takes:
            allowed = [f"--{f.replace('_', '-')}" for f, k in METHOD_FLAGS.items() if k in takes]
            parser.error(f"--{flag.replace('_', '-')} does not apply to --method {args.method}; it takes "
                         + (", ".join(allowed) if allowed else "no method options"))
    for flag in ("coalitions", "samples"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1; got {getattr(args, flag)}")
    return {keyword: getattr(args, flag) for flag, keyword in given.items()}


def _checked_attribute(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    options = _method_options(parser, args)
    if args.size < 1 or args.batch_size < 1 or (isinstance(args.steps, int) and args.steps < 1):
        parser.error("--size, --batch-size and --steps must be >= 1 (--steps may also be auto)")
    if args.tolerance is not None and (args.steps != "auto" or not 0 < args.tolerance < float("inf")):
        parser.error("--tolerance must be a positive finite number and goes with --steps auto")
    if args.batch_tokens is not None and (args.batch_tokens < 1 or not args.sort_by_length):
        parser.error("--batch-tokens must be >= 1 and cannot go with --no-sort-by-length")
    return run_attribute(args, options)


def run_demo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from fastattr.demo import demo as demo_module

    for name in ("patients", "updates", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1; got {value}")
    demo_module.run(patients=args.patients or (1000 if args.quick else 2000), seed=args.seed, steps=args.steps,
                    updates=args.updates or (300 if args.quick else 600), device=args.device, out=args.out,
                    repeats=1 if args.quick else 3, save_model=args.save_model)
    return 0


def run_evaluate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``fastattr evaluate RUN --checkpoint model.pt``: errors of the inputs and a folder another
    process is scoring end with one line and status 2; Ctrl-C with 130 (the scores so far stay)."""
    import torch

    from fastattr.demo.models import load_checkpoint
    from fastattr.report.scores import evaluate_run

    if args.percentages is not None and any(not 0 < p <= 100 for p in args.percentages):
        parser.error("--percentages must lie in (0, 100]")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    done: list[Any] = []

    def score() -> None:
        model, _ = load_checkpoint(args.checkpoint, map_location=device)
        options = {"percentages": args.percentages} if args.percentages else {}
        done.append(evaluate_run(args.run, model, resume=not args.no_resume, **options))
    status = _resumable("evaluate", args.run, score)
    if status:
        return status
    scores = done[0]
    rows = scores.all()
    valid = rows["valid"]
    print(f"scored {int(valid.sum())} of {len(valid)} patients of {args.run}: comprehensiveness "
          f"{rows['comprehensiveness'][valid].mean():.4f}, sufficiency {rows['sufficiency'][valid].mean():.4f} "
          f"(means over the scored); wrote {scores.out}")
    return 0


def run_tables(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``fastattr export | summarize | report``: errors about the run folder end the command with
    their message, not a traceback."""
    from pathlib import Path

    from fastattr.report import page
    from fastattr.runs import tables

    if getattr(args, "top", 1) < 1:
        parser.error("--top must be >= 1")
    if getattr(args, "patients", 0) < 0:
        parser.error("--patients must be >= 0")
    try:
        if args.command == "export":
            output = args.output or Path(args.run) / f"attributions.{args.format or 'parquet'}"
            path = tables.export(args.run, output, format=args.format)
            print(f"wrote {path}")
        elif args.command == "summarize":
            frame = tables.summarize(args.run, by_class=args.by_class)
            import pandas as pd

            with pd.option_context("display.width", 160, "display.max_columns", 20):
                print(f"{frame.attrs['samples']} samples; class = {frame.attrs['class_rule']}")
                print(frame.head(args.top).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
            if args.output:
                output = Path(args.output)
                if output.suffix == ".parquet":
                    frame.to_parquet(output, index=False)
                else:
                    frame.to_csv(output, index=False)
                print(f"wrote {output}")
        else:
            path = page.write_report(args.runs, args.output, top=args.top, patients=args.patients)
            print(f"wrote {path}")
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"fastattr {args.command}: {exc}", file=sys.stderr)
        return 2
    return 0


def run_attribute(args: argparse.Namespace, options: dict[str, Any] | None = None) -> int:
    """``fastattr attribute``: a full disk, a folder another run is writing, a folder that is not a
    run and other errors of the inputs end the command with one line and status 2; Ctrl-C with
    status 130. Either way what was finished stays for the resume. ``options``: the method's keywords."""
    return _resumable("attribute", args.out, lambda: _attribute(args, options or {}))


def _resumable(command: str, folder: str, work: Any) -> int:
    """Run ``work()``: errors of the inputs and of the run folder (a full disk, another writer, a folder
    that is not a run) end with one line and status 2, Ctrl-C with 130 (what was finished stays)."""
    from fastattr.runs.files import DiskFullError
    from fastattr.runs.locks import RunLockedError

    try:
        work()
    except (DiskFullError, RunLockedError, FileExistsError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"fastattr {command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastattr {command}: interrupted; run the same command again to resume {folder}", file=sys.stderr)
        return 130
    return 0


def _attribute(args: argparse.Namespace, options: dict[str, Any]) -> None:
    import os

    import torch

    from fastattr.cohort.methods import build_interpreter
    from fastattr.cohort.runner import attribute_dataset
    from fastattr.demo.models import load_checkpoint
    from fastattr.demo.synthetic import CohortDataset, SyntheticCohort

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    model, extra = load_checkpoint(args.checkpoint, map_location=device)
    cohort_args = dict(extra.get("cohort", {}))
    if args.seed is not None:
        cohort_args["seed"] = args.seed
    cohort = SyntheticCohort(**{**cohort_args, "patients": args.size})
    if len(cohort.names) != model.dataset.input_processors["codes"].size:
        raise ValueError(f"the checkpoint's vocabulary ({model.dataset.input_processors['codes'].size} ids) does not "
                         f"match the cohort's ({len(cohort.names)})")
    loader = torch.utils.data.DataLoader(CohortDataset(cohort), batch_size=args.batch_size, shuffle=False,
                                         collate_fn=CohortDataset.collate)
    if options.get("precision") == "fp32":  # the default: not recorded as a call option
        del options["precision"]
    interpreter, kwargs = build_interpreter(args.method, model, options)
    sort = "auto" if args.sort_by_length else False  # methods whose values depend on the batch keep its batches
    attribute_dataset(interpreter, loader, args.out, resume=not args.no_resume, sort_by_length=sort,
                      batch_tokens=args.batch_tokens, vocab={"codes": cohort.names}, annotations=cohort.annotations(),
                      **kwargs)


if __name__ == "__main__":
    raise SystemExit(main())
