"""Long-tailed lengths: what padding costs, and what length-aware packing and sorting save.

    python -m benchmarks.long_tail batch     # IG, one batch of 32 long-tailed patients
    python -m benchmarks.long_tail cohort    # whole cohorts: IG (128 patients) and Chefer (512, 4 layers)
    python -m benchmarks.long_tail chunks    # auto chunk size against every fixed chunk, over a grid
    python -m benchmarks.long_tail loops     # as users call it: batch-1 loop, batch-32 loop, attribute_dataset
    python -m benchmarks.long_tail tokens    # attribute_dataset over a batch-1 loader: padded positions per batch
    python -m benchmarks.long_tail groups    # a batch-32 loop for each per-group cost: what GROUP_COST is chosen from
    python -m benchmarks.long_tail groups --methods ig-auto    # the same for IG's steps="auto" rounds

Run it with the PyHealth environment's python to time PyHealth itself; without PyHealth the
baseline is ``fastattr.loop`` (PyHealth's algorithms restated) on fastattr's own Transformer, and
every table says which. Timings are medians of interleaved repeats in one run (CUDA events on a
GPU); every method's results are checked against the baseline before anything is timed.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import torch

import fastattr
from benchmarks.timing import table
from fastattr.cohort import LengthSortedBatches, attribute_dataset, load_attributions
from fastattr.demo.bench import cohort_data, cohort_loaders, pyhealth_available, rel_err, to_device, user_call_rows
from fastattr.demo.timing import time_interleaved
from fastattr.loop import full_chefer_relevance, step_loop_integrated_gradients


def header(args, use_pyhealth: bool) -> str:
    base = "PyHealth 2.1.0" if use_pyhealth else "fastattr.loop (PyHealth's algorithms restated; PyHealth absent)"
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    return (f"device {args.device} ({dev}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
            f"baseline {base}, model {'pyhealth.Transformer' if use_pyhealth else 'fastattr.TransformerClassifier'} "
            f"{args.layers}L/{args.heads}H/d{args.dim}")


def run_batch(args) -> None:
    use_pyhealth = pyhealth_available() and args.device == "cpu"
    model, items, collate = cohort_data(args.batch, args.median, args.longest, args.layers, args.heads, args.dim,
                                        args.device, use_pyhealth, seed=args.seed)
    data = to_device(collate(items), args.device)
    data = {"codes": data["codes"]}
    lengths = (data["codes"] != 0).sum(1).float()
    print(header(args, use_pyhealth))
    print(f"batch {args.batch}, lengths median {lengths.median():.0f}, longest {lengths.max():.0f} (padded to "
          f"{data['codes'].shape[1]}), steps {args.steps}")
    ours = fastattr.IntegratedGradients(model, steps=args.steps)
    if use_pyhealth:
        from pyhealth.interpret.methods import IntegratedGradients as PyHealthIG

        theirs = PyHealthIG(model, steps=args.steps)
        base_name, base = "pyhealth", lambda: theirs.attribute(**data)
    else:
        base_name, base = "step-loop", lambda: step_loop_integrated_gradients(model, steps=args.steps, **data)
    fns = {base_name: base,
           "fastattr padded (pack_lengths=False)": lambda: ours.attribute(pack_lengths=False, **data),
           "fastattr packed (default)": lambda: ours.attribute(**data)}
    ref = base()["codes"]
    for name, fn in fns.items():
        err = rel_err(fn()["codes"], ref)
        assert err <= 1e-5, f"{name} differs from {base_name} by {err:.2e}"
    ours.attribute(**data)
    print("groups (patients, padded length):", [(n, s[0] if s else None) for n, s in ours.last_groups],
          "rows per forward:", ours.last_internal_batch_size)
    table(time_interleaved(fns, args.repeats, args.device), base_name)


def _timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_cohort(args) -> None:
    use_pyhealth = pyhealth_available() and args.device == "cpu"
    print(header(args, use_pyhealth))
    for method, patients, layers in (("ig", args.ig_patients, args.layers), ("chefer", args.chefer_patients,
                                                                               args.chefer_layers)):
        model, items, collate = cohort_data(patients, args.median, args.longest, layers, args.heads, args.dim,
                                            args.device, use_pyhealth, seed=args.seed)
        loader = [to_device(collate(items[i:i + args.batch]), args.device) for i in range(0, patients, args.batch)]
        lengths = torch.tensor([int((b["codes"] != 0).sum()) for b in (collate([it]) for it in items)]).float()
        if method == "ig":
            ours = fastattr.IntegratedGradients(model, steps=args.steps)
            if use_pyhealth:
                from pyhealth.interpret.methods import IntegratedGradients as PyHealthIG

                theirs = PyHealthIG(model, steps=args.steps)

                def base(b):
                    return theirs.attribute(codes=b["codes"])
            else:
                def base(b):
                    return step_loop_integrated_gradients(model, steps=args.steps, codes=b["codes"])
        else:
            ours = fastattr.CheferRelevance(model)
            if use_pyhealth:
                from pyhealth.interpret.methods import CheferRelevance as PyHealthChefer

                theirs = PyHealthChefer(model)

                def base(b):
                    return theirs.attribute(**b)
            else:
                def base(b):
                    return full_chefer_relevance(model, **b)
        base_name = "pyhealth" if use_pyhealth else ("step-loop" if method == "ig" else "full-R-loop")

        class Dataset(torch.utils.data.Dataset):
            def __len__(self):
                return len(items)

            def __getitem__(self, i):
                return items[i]

        def sorted_batches():
            return LengthSortedBatches(Dataset(), model, batch_size=args.batch,
                                       collate_fn=lambda xs: to_device(collate(xs), args.device))

        def whole_job(batches, folder):
            attribute_dataset(ours, batches, folder, resume=False, progress=False)

        def baseline_job():
            return [base(b)["codes"] for b in loader]

        # correctness first: every patient's attribution of the sorted whole job against the baseline
        with tempfile.TemporaryDirectory() as tmp:
            whole_job(sorted_batches(), tmp)
            store = load_attributions(tmp)
            ref = baseline_job()
            worst = 0.0
            for i in range(patients):
                row = ref[i // args.batch][i % args.batch]
                got = store[i]["attr/codes"]
                n = int(lengths[i])
                worst = max(worst, rel_err(got[:n], row[:n].cpu()) if row[:n].abs().max() > 0 else 0.0)
            assert worst <= 1e-4, f"{method}: sorted whole job differs from {base_name} by {worst:.2e}"
        times: dict[str, list[float]] = {base_name: [], "fastattr, dataloader order": [],
                                         "fastattr, sorted by length": [],
                                         "fastattr, sorted, attribute() alone (no shards)": []}
        presorted = list(sorted_batches())
        for _ in range(args.repeats):
            times[base_name].append(_timed(baseline_job, args.device))
            with tempfile.TemporaryDirectory() as tmp:
                times["fastattr, dataloader order"].append(_timed(lambda: whole_job(loader, tmp), args.device))
            with tempfile.TemporaryDirectory() as tmp:
                times["fastattr, sorted by length"].append(_timed(lambda: whole_job(sorted_batches(), tmp),
                                                                  args.device))
            times["fastattr, sorted, attribute() alone (no shards)"].append(
                _timed(lambda: [ours.attribute(**b) for b in presorted], args.device))
        print(f"\n{method}: {patients} patients, batch {args.batch}, {layers} layers, lengths median "
              f"{lengths.median():.0f}, longest {lengths.max():.0f}"
              + (f", steps {args.steps}" if method == "ig" else "")
              + f"; max rel. err. of the sorted job vs {base_name}: {worst:.1e} (whole job incl. writing shards)")
        stats = {k: {"median_ms": statistics.median(v) * 1e3, "min_ms": min(v) * 1e3, "max_ms": max(v) * 1e3,
                     "peak_mem_mb": float("nan")} for k, v in times.items()}
        table(stats, base_name)


def _loop_data(method: str, args, use_pyhealth: bool):
    """The model, its samples and a loader factory (PyHealth's get_dataloader when PyHealth
    imports) for one method of ``loops``, ``tokens`` and ``groups``."""
    ig = method.startswith("ig")
    patients = args.ig_patients if ig else args.chefer_patients
    layers = args.layers if ig else args.chefer_layers
    model, items, loader = cohort_loaders(patients, args.median, args.longest, layers, args.heads, args.dim,
                                          args.device, use_pyhealth, seed=args.seed)
    return model, items, loader, layers


def run_loops(args) -> None:
    """Both methods as users call them (``fastattr.demo.bench.user_call_rows``: a batch-1 loop, a
    batch-32 loop, ``attribute_dataset`` with its defaults), each checked against the baseline
    before it is timed."""
    use_pyhealth = pyhealth_available()
    print(header(args, use_pyhealth) + f"; IG {args.layers} layers, Chefer {args.chefer_layers} layers")
    for method in args.methods:
        patients = args.ig_patients if method == "ig" else args.chefer_patients
        layers = args.layers if method == "ig" else args.chefer_layers
        rows = user_call_rows(method, patients, layers, args.heads, args.dim, args.steps, args.device, args.repeats,
                              use_pyhealth, median=args.median, longest=args.longest, seed=args.seed)
        base = rows[0]["baseline"]
        print(f"\n{method}: {patients} patients, lengths median {args.median}, longest {rows[0]['seq_len']}, {layers} "
              f"layers" + (f", steps {args.steps}" if method == "ig" else "") +
              f", {args.repeats} interleaved repeats after a warm-up")
        print(f"| how the user calls it | {base} | fastattr | speedup | max rel. err. |")
        print("|---|---|---|---|---|")
        for theirs, ours in zip(rows[::2], rows[1::2], strict=False):
            name = ours["workload"].split(": ", 1)[1]
            print(f"| {name} | {theirs['median_ms'] / 1e3:.2f} s | {ours['median_ms'] / 1e3:.2f} s | "
                  f"{ours['speedup_vs_baseline']:.2f}x | {ours['max_rel_err']:.1e} |", flush=True)


def run_tokens(args) -> None:
    """``attribute_dataset`` over a loader of batch size 1, rebatched into sorted batches of each
    ``--token-budgets`` padded positions: what ``COHORT_BATCH_TOKENS`` is chosen from."""
    use_pyhealth = pyhealth_available()
    print(header(args, use_pyhealth) + f"; IG {args.layers} layers, Chefer {args.chefer_layers} layers")
    for method in ("ig", "chefer"):
        model, dataset, loader, layers = _loop_data(method, args, use_pyhealth)
        interp = fastattr.IntegratedGradients(model, steps=args.steps) if method == "ig" else \
            fastattr.CheferRelevance(model)
        one = loader(1)

        def job(tokens):
            def run():
                with tempfile.TemporaryDirectory() as tmp:
                    attribute_dataset(interp, one, tmp, progress=False, batch_tokens=tokens)
            return run
        stats = time_interleaved({f"{t}": job(t) for t in args.token_budgets}, args.repeats, args.device)
        best = min(stats, key=lambda k: stats[k]["median_ms"])
        print(f"\n{method}: {len(dataset)} patients, {layers} layers, batch-1 loader rebatched by padded positions")
        print("| padded positions per batch | median s | vs best |")
        print("|---|---|---|")
        for name, st in stats.items():
            print(f"| {name} | {st['median_ms'] / 1e3:.2f} | {st['median_ms'] / stats[best]['median_ms']:.2f}x |",
                  flush=True)


def _grouped_interpreter(method: str, model, steps: int):
    """The interpreter ``groups`` times and the key of its cost in ``GROUP_COST``."""
    if method == "ig":
        return fastattr.IntegratedGradients(model, steps=steps), "integrated_gradients"
    if method == "ig-auto":
        return fastattr.IntegratedGradients(model, steps="auto"), "adaptive_integrated_gradients"
    return fastattr.CheferRelevance(model), "chefer"


def run_groups(args) -> None:
    """A loop over batches of 32 long-tailed patients, once per candidate per-group cost of the
    length packing (``fastattr.core.packing.GROUP_COST[method][device]``): fewer, larger groups
    pad more; more, smaller groups pay each group's fixed forward and backward."""
    from fastattr.core import packing

    use_pyhealth = pyhealth_available()
    print(header(args, use_pyhealth) + f"; IG {args.layers} layers, Chefer {args.chefer_layers} layers")
    device = torch.device(args.device).type
    for method in args.methods:
        model, dataset, loader, layers = _loop_data(method, args, use_pyhealth)
        interp, key = _grouped_interpreter(method, model, args.steps)
        batches = list(loader(args.batch))
        original = packing.GROUP_COST[key][device]

        def loop(cost):
            def run():
                packing.GROUP_COST[key][device] = cost
                try:
                    return [interp.attribute(**b) for b in batches]
                finally:
                    packing.GROUP_COST[key][device] = original
            return run
        groups = {}
        for cost in args.costs:
            loop(cost)()
            groups[cost] = len(interp.last_groups)
        stats = time_interleaved({f"{c:g}": loop(c) for c in args.costs}, args.repeats, args.device)
        best = min(stats, key=lambda k: stats[k]["median_ms"])
        print(f"\n{method}: {len(dataset)} patients in batches of {args.batch}, {layers} layers; current "
              f"GROUP_COST[{key!r}][{device!r}] = {original:g}")
        print("| per-group cost (row-positions) | groups in the last batch | median s | vs best |")
        print("|---|---|---|---|")
        for cost in args.costs:
            st = stats[f"{cost:g}"]
            print(f"| {cost:g} | {groups[cost]} | {st['median_ms'] / 1e3:.3f} | "
                  f"{st['median_ms'] / stats[best]['median_ms']:.2f}x |", flush=True)


def run_chunks(args) -> None:
    """Auto chunk size against fixed chunks of 1, 2, 4, 8, 16 and all path points of the batch."""
    from fastattr.demo.models import FeatureProcessor, FeatureSpec, TransformerClassifier

    print(header(args, False) + " (dims vary per row)")
    print("| length | batch | dim | auto rows | auto ms | best fixed (points) | best ms | auto / best |")
    print("|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for length in args.lengths:
        for batch in args.batches:
            for dim in args.dims:
                torch.manual_seed(0)
                spec = FeatureSpec({"codes": FeatureProcessor(token=True, size=502)}, {"label": "binary"})
                model = TransformerClassifier(spec, num_classes=2, dim=dim, heads=4,
                                              layers=args.layers).to(args.device).eval()
                data = {"codes": torch.randint(2, 502, (batch, length)).to(args.device)}
                ig = fastattr.IntegratedGradients(model, steps=args.steps)
                points = args.steps + 1
                fns = {"auto": lambda: ig.attribute(**data)}
                for p in (1, 2, 4, 8, 16, points):
                    if p <= points:
                        fns[f"{p}"] = lambda r=p * batch: ig.attribute(internal_batch_size=r, **data)
                ig.attribute(**data)
                auto_rows = ig.last_internal_batch_size
                stats = time_interleaved(fns, args.repeats, args.device)
                best = min((k for k in stats if k != "auto"), key=lambda k: stats[k]["median_ms"])
                ratio = stats["auto"]["median_ms"] / stats[best]["median_ms"]
                worst = max(worst, ratio)
                print(f"| {length} | {batch} | {dim} | {auto_rows} | {stats['auto']['median_ms']:.0f} | {best} | "
                      f"{stats[best]['median_ms']:.0f} | {ratio:.2f} |", flush=True)
    print(f"\nworst auto / best fixed: {worst:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["batch", "cohort", "chunks", "loops", "tokens", "groups"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--median", type=int, default=15)
    parser.add_argument("--longest", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--chefer-layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--ig-patients", type=int, default=128)
    parser.add_argument("--chefer-patients", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8, 32, 128, 512])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--dims", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--methods", nargs="+", choices=["ig", "ig-auto", "chefer"], default=["ig", "chefer"],
                        help="ig-auto (steps='auto'): groups only")
    parser.add_argument("--costs", type=float, nargs="+", default=[0, 100, 300, 1000, 3000, 10000, 1e12])
    parser.add_argument("--token-budgets", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    args = parser.parse_args()
    if "ig-auto" in args.methods and args.what != "groups":
        parser.error("--methods ig-auto is measured by 'groups' only")
    if args.threads:
        torch.set_num_threads(args.threads)
    {"batch": run_batch, "cohort": run_cohort, "chunks": run_chunks, "loops": run_loops,
     "tokens": run_tokens, "groups": run_groups}[args.what](args)


if __name__ == "__main__":
    main()
