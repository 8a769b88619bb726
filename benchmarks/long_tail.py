"""Long-tailed lengths: what padding costs, and what length-aware packing and sorting save.

    python -m benchmarks.long_tail batch     # IG, one batch of 32 long-tailed patients
    python -m benchmarks.long_tail cohort    # whole cohorts: IG (128 patients) and Chefer (512, 4 layers)
    python -m benchmarks.long_tail chunks    # auto chunk size against every fixed chunk, over a grid
    python -m benchmarks.long_tail loops     # as users call it: batch-1 loop, batch-32 loop, attribute_dataset
    python -m benchmarks.long_tail tokens    # attribute_dataset over a batch-1 loader: padded positions per batch

Run it with the PyHealth environment's python to time PyHealth itself; without PyHealth the
baseline is ``fastattr.loop`` (PyHealth's algorithms restated) on fastattr's own Transformer, and
every table says which. Timings are medians of interleaved repeats in one run (CUDA events on a
GPU); every method's results are checked against the baseline before anything is timed.
"""
from __future__ import annotations

import argparse
import platform
import random
import statistics
import tempfile
import time

import torch

import fastattr
from fastattr.loop import full_chefer_relevance, step_loop_integrated_gradients
from fastattr.tools.bench import pyhealth_available, time_interleaved
from fastattr.tools.cohort import LengthSortedBatches, attribute_dataset, load_attributions
from fastattr.tools.synthetic import long_tailed_lengths

from benchmarks.timing import table


def cohort_data(patients: int, median: int, longest: int, layers: int, heads: int, dim: int, device: str,
                use_pyhealth: bool, seed: int = 0):
    """A Transformer over one token feature and a map-style dataset of long-tailed patients with
    its collate function: PyHealth's (Transformer, SampleDataset) or fastattr's own."""
    sizes = long_tailed_lengths(patients, median=median, longest=longest, seed=seed)
    rng = random.Random(seed)
    if use_pyhealth:
        from pyhealth.datasets import create_sample_dataset
        from pyhealth.datasets.utils import collate_fn_dict_with_padding
        from pyhealth.models import Transformer

        samples = [{"patient_id": f"p{i}", "visit_id": "v", "label": i % 2,
                    "codes": [f"c{rng.randrange(500)}" for _ in range(n)]} for i, n in enumerate(sizes)]
        dataset = create_sample_dataset(samples=samples, input_schema={"codes": "sequence"},
                                        output_schema={"label": "binary"}, dataset_name=f"tail{seed}")
        torch.manual_seed(seed)
        model = Transformer(dataset=dataset, embedding_dim=dim, heads=heads, num_layers=layers)
        items = [dataset[i] for i in range(len(dataset))]
        collate = collate_fn_dict_with_padding
    else:
        from fastattr.tools.models import FeatureProcessor, FeatureSpec, TransformerClassifier

        torch.manual_seed(seed)
        spec = FeatureSpec({"codes": FeatureProcessor(token=True, size=502)}, {"label": "binary"})
        model = TransformerClassifier(spec, num_classes=2, dim=dim, heads=heads, layers=layers)
        items = [{"patient_id": f"p{i}", "codes": torch.tensor([rng.randrange(2, 502) for _ in range(n)]),
                  "label": torch.tensor(i % 2)} for i, n in enumerate(sizes)]

        def collate(batch):
            codes = torch.nn.utils.rnn.pad_sequence([b["codes"] for b in batch], batch_first=True)
            return {"patient_id": [b["patient_id"] for b in batch], "codes": codes,
                    "label": torch.stack([b["label"] for b in batch])}
    model = model.to(device).eval()
    return model, items, collate


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


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
                base = lambda b: theirs.attribute(codes=b["codes"])
            else:
                base = lambda b: step_loop_integrated_gradients(model, steps=args.steps, codes=b["codes"])
        else:
            ours = fastattr.CheferRelevance(model)
            if use_pyhealth:
                from pyhealth.interpret.methods import CheferRelevance as PyHealthChefer

                theirs = PyHealthChefer(model)
                base = lambda b: theirs.attribute(**b)
            else:
                base = lambda b: full_chefer_relevance(model, **b)
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
              f"{lengths.median():.0f}, longest {lengths.max():.0f}" + (f", steps {args.steps}" if method == "ig" else "")
              + f"; max rel. err. of the sorted job vs {base_name}: {worst:.1e} (whole job incl. writing shards)")
        stats = {k: {"median_ms": statistics.median(v) * 1e3, "min_ms": min(v) * 1e3, "max_ms": max(v) * 1e3,
                     "peak_mem_mb": float("nan")} for k, v in times.items()}
        table(stats, base_name)


def _loop_data(method: str, args, use_pyhealth: bool):
    """The model, the long-tailed dataset and a loader factory for one method of ``loops``."""
    patients = args.ig_patients if method == "ig" else args.chefer_patients
    layers = args.layers if method == "ig" else args.chefer_layers
    model, items, collate = cohort_data(patients, args.median, args.longest, layers, args.heads, args.dim,
                                        args.device, use_pyhealth, seed=args.seed)

    class Dataset(torch.utils.data.Dataset):
        def __len__(self):
            return len(items)

        def __getitem__(self, i):
            return items[i]

    dataset = Dataset()

    def loader(batch_size: int):
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                           collate_fn=lambda xs: to_device(collate(xs), args.device))
    return model, dataset, loader, layers


def run_loops(args) -> None:
    """The three ways a PyHealth user calls an interpreter, for both methods, with no options: a
    loop over a batch-size-1 dataloader (PyHealth's docs recommend it for interpretability), a loop
    over batch size 32, and ``fastattr.attribute_dataset`` over the batch-32 loader with its
    defaults (against PyHealth looping over that loader). Every fastattr row is checked against
    PyHealth's attributions before anything is timed."""
    use_pyhealth = pyhealth_available()
    print(header(args, use_pyhealth) + f"; IG {args.layers} layers, Chefer {args.chefer_layers} layers")
    for method in args.methods:
        model, dataset, loader, layers = _loop_data(method, args, use_pyhealth)
        if method == "ig":
            ours = fastattr.IntegratedGradients(model, steps=args.steps)
            if use_pyhealth:
                from pyhealth.interpret.methods import IntegratedGradients as PyHealthIG

                theirs = PyHealthIG(model, steps=args.steps)
                base = theirs.attribute
            else:
                base = lambda **b: step_loop_integrated_gradients(model, steps=args.steps, **b)
        else:
            ours = fastattr.CheferRelevance(model)
            if use_pyhealth:
                from pyhealth.interpret.methods import CheferRelevance as PyHealthChefer

                base = PyHealthChefer(model).attribute
            else:
                base = lambda **b: full_chefer_relevance(model, **b)
        base_name = "PyHealth" if use_pyhealth else "fastattr.loop"
        one, many = loader(1), loader(args.batch)
        lengths = torch.tensor([int((dataset[i]["codes"] != 0).sum()) if isinstance(dataset[i]["codes"], torch.Tensor)
                                else len(dataset[i]["codes"]) for i in range(len(dataset))]).float()

        def loop(fn, batches):
            return [fn(**b)["codes"] for b in batches]

        # correctness first: every row's attributions against the baseline's, patient by patient
        ref_one, ref_many = loop(base, one), loop(base, many)
        worst = {}
        for name, got, ref in (("batch-1 loop", loop(ours.attribute, one), ref_one),
                               ("batch-32 loop", loop(ours.attribute, many), ref_many)):
            worst[name] = max(rel_err(g, r) for g, r in zip(got, ref))
        with tempfile.TemporaryDirectory() as tmp:
            attribute_dataset(ours, many, tmp, progress=False)
            store = load_attributions(tmp)
            flat = [row for batch in ref_many for row in batch]
            worst["attribute_dataset"] = max(
                rel_err(store[i]["attr/codes"][: int(lengths[i])], flat[i][: int(lengths[i])]) for i in range(len(flat)))
        for name, err in worst.items():
            assert err <= 1e-5, f"{method} {name} differs from {base_name} by {err:.2e}"

        def job():
            with tempfile.TemporaryDirectory() as tmp:
                attribute_dataset(ours, many, tmp, progress=False)

        rows = [("batch-1 loop", lambda: loop(base, one), lambda: loop(ours.attribute, one)),
                ("batch-32 loop", lambda: loop(base, many), lambda: loop(ours.attribute, many)),
                ("attribute_dataset, default options (vs the PyHealth batch-32 loop)", lambda: loop(base, many), job)]
        print(f"\n{method}: {len(dataset)} patients, lengths median {lengths.median():.0f}, longest "
              f"{lengths.max():.0f}, {layers} layers" + (f", steps {args.steps}" if method == "ig" else "")
              + f", {args.repeats} interleaved repeats after a warm-up")
        print(f"| how the user calls it | {base_name} | fastattr | speedup | max rel. err. |")
        print("|---|---|---|---|---|")
        for name, theirs_fn, ours_fn in rows:
            stats = time_interleaved({"theirs": theirs_fn, "ours": ours_fn}, args.repeats, args.device)
            t, o = stats["theirs"]["median_ms"] / 1e3, stats["ours"]["median_ms"] / 1e3
            err = worst["attribute_dataset" if name.startswith("attribute_dataset") else name]
            print(f"| {name} | {t:.2f} s | {o:.2f} s | {t / o:.2f}x | {err:.1e} |", flush=True)


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


def run_chunks(args) -> None:
    """Auto chunk size against fixed chunks of 1, 2, 4, 8, 16 and all path points of the batch."""
    from fastattr.tools.models import FeatureProcessor, FeatureSpec, TransformerClassifier

    print(header(args, False) + " (dims vary per row)")
    print("| length | batch | dim | auto rows | auto ms | best fixed (points) | best ms | auto / best |")
    print("|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for length in args.lengths:
        for batch in args.batches:
            for dim in args.dims:
                torch.manual_seed(0)
                spec = FeatureSpec({"codes": FeatureProcessor(token=True, size=502)}, {"label": "binary"})
                model = TransformerClassifier(spec, num_classes=2, dim=dim, heads=4, layers=args.layers).to(args.device).eval()
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
    parser.add_argument("what", choices=["batch", "cohort", "chunks", "loops", "tokens"])
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
    parser.add_argument("--methods", nargs="+", choices=["ig", "chefer"], default=["ig", "chefer"])
    parser.add_argument("--token-budgets", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    {"batch": run_batch, "cohort": run_cohort, "chunks": run_chunks, "loops": run_loops,
     "tokens": run_tokens}[args.what](args)


if __name__ == "__main__":
    main()
