"""``fastattr bench``: side-by-side timings of fastattr against the methods it replaces.

On the machine at hand and in one run, on the same model and batch: fastattr (each backend that
runs here) against PyHealth's IntegratedGradients / CheferRelevance when PyHealth imports (else
the same algorithms as ``fastattr.loop`` restates them), and Captum's IntegratedGradients when it
imports. Every method's attributions are checked against the baseline before anything is timed;
then each gets a warm-up and ``repeats`` interleaved timed calls (CUDA events on a GPU).
"""
from __future__ import annotations

import csv
import importlib.util
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fastattr.core.backend import interpreter_enabled, triton_available
from fastattr.demo.synthetic import long_tailed_lengths
from fastattr.demo.timing import time_interleaved
from fastattr.interpret.attention.chefer import CheferRelevance
from fastattr.interpret.batches import move_batch
from fastattr.interpret.gradient.ig import IntegratedGradients
from fastattr.loop import full_chefer_relevance, step_loop_integrated_gradients

COLUMNS = ["workload", "method", "baseline", "device", "model", "seq_len", "steps", "batch", "layers", "heads",
           "dim", "repeats", "median_ms", "min_ms", "max_ms", "speedup_vs_baseline", "max_rel_err", "peak_mem_mb",
           "torch"]


def pyhealth_available() -> bool:
    try:
        import pyhealth.interpret.methods  # noqa: F401
    except Exception:  # its import chain can fail in several ways (torchvision, optional deps)
        return False
    return True


def build_model(length: int, batch: int, layers: int, heads: int, dim: int, device: str, use_pyhealth: bool,
                long_tail: bool = False):
    """A Transformer over one token feature ``codes``, and a batch for it: every patient with
    ``length`` codes, or with ``long_tail`` log-normal lengths (median ``length``, longest up to
    8x that), padded to the batch's longest as a dataloader pads them."""
    rng = random.Random(0)
    sizes = long_tailed_lengths(max(batch, 8), median=length,
                                longest=8 * length) if long_tail else [length] * max(batch, 8)
    if use_pyhealth:
        from pyhealth.datasets import create_sample_dataset, get_dataloader
        from pyhealth.models import Transformer

        samples = [{"patient_id": f"p{i}", "visit_id": "v", "label": i % 2,
                    "codes": [f"c{rng.randrange(500)}" for _ in range(n)]} for i, n in enumerate(sizes)]
        dataset = create_sample_dataset(samples=samples, input_schema={"codes": "sequence"},
                                        output_schema={"label": "binary"}, dataset_name="bench")
        torch.manual_seed(0)
        model = Transformer(dataset=dataset, embedding_dim=dim, heads=heads, num_layers=layers)
        data = next(iter(get_dataloader(dataset, batch_size=batch)))
        codes = data["codes"]
    else:
        from fastattr.demo.models import FeatureProcessor, FeatureSpec, TransformerClassifier

        torch.manual_seed(0)
        spec = FeatureSpec({"codes": FeatureProcessor(token=True, size=502)}, {"label": "binary"})
        model = TransformerClassifier(spec, num_classes=2, dim=dim, heads=heads, layers=layers)
        codes = torch.randint(2, 502, (batch, max(sizes[:batch])), generator=torch.Generator().manual_seed(0))
        codes = codes * (torch.arange(codes.shape[1]) < torch.tensor(sizes[:batch])[:, None])
    return model.to(device).eval(), {"codes": codes.to(device)}


def cohort_data(patients: int, median: int, longest: int, layers: int, heads: int, dim: int, device: str,
                use_pyhealth: bool, seed: int = 0, classes: int = 2):
    """A Transformer over one token feature and a map-style dataset of long-tailed patients with
    its collate function: PyHealth's (Transformer, SampleDataset) or fastattr's own; binary labels,
    or multiclass with ``classes`` > 2."""
    mode = "binary" if classes == 2 else "multiclass"
    sizes = long_tailed_lengths(patients, median=median, longest=longest, seed=seed)
    rng = random.Random(seed)
    if use_pyhealth:
        from pyhealth.datasets import create_sample_dataset
        from pyhealth.datasets.utils import collate_fn_dict_with_padding
        from pyhealth.models import Transformer

        samples = [{"patient_id": f"p{i}", "visit_id": "v", "label": i % classes,
                    "codes": [f"c{rng.randrange(500)}" for _ in range(n)]} for i, n in enumerate(sizes)]
        dataset = create_sample_dataset(samples=samples, input_schema={"codes": "sequence"},
                                        output_schema={"label": mode}, dataset_name=f"tail{seed}-{classes}")
        torch.manual_seed(seed)
        model = Transformer(dataset=dataset, embedding_dim=dim, heads=heads, num_layers=layers)
        items = [dataset[i] for i in range(len(dataset))]
        collate = collate_fn_dict_with_padding
    else:
        from fastattr.demo.models import FeatureProcessor, FeatureSpec, TransformerClassifier

        torch.manual_seed(seed)
        spec = FeatureSpec({"codes": FeatureProcessor(token=True, size=502)}, {"label": mode})
        model = TransformerClassifier(spec, num_classes=classes, dim=dim, heads=heads, layers=layers)
        items = [{"patient_id": f"p{i}", "codes": torch.tensor([rng.randrange(2, 502) for _ in range(n)]),
                  "label": torch.tensor(i % classes)} for i, n in enumerate(sizes)]

        def collate(batch):
            codes = torch.nn.utils.rnn.pad_sequence([b["codes"] for b in batch], batch_first=True)
            return {"patient_id": [b["patient_id"] for b in batch], "codes": codes,
                    "label": torch.stack([b["label"] for b in batch])}
    model = model.to(device).eval()
    return model, items, collate


def cohort_loaders(patients: int, median: int, longest: int, layers: int, heads: int, dim: int, device: str,
                   use_pyhealth: bool, seed: int = 0, classes: int = 2):
    """:func:`cohort_data`'s model and samples with a loader factory ``loader(batch_size)`` as users
    make one: PyHealth's own ``get_dataloader(dataset, batch_size, shuffle=False)`` over its
    dataset, or a ``DataLoader`` over fastattr's samples padding each batch to its longest."""
    model, items, collate = cohort_data(patients, median, longest, layers, heads, dim, device, use_pyhealth, seed,
                                        classes)
    if use_pyhealth:
        from pyhealth.datasets import get_dataloader

        return model, items, lambda size: get_dataloader(model.dataset, batch_size=size, shuffle=False)

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return len(items)

        def __getitem__(self, i):
            return items[i]
    return model, items, lambda size: torch.utils.data.DataLoader(
        Items(), batch_size=size, shuffle=False, collate_fn=lambda xs: to_device(collate(xs), device))


def to_device(batch: dict, device: str) -> dict:
    return move_batch(batch, device)


def captum_ig(model: Any, data: dict[str, torch.Tensor], steps: int, chunk: int) -> Callable[[], torch.Tensor]:
    """Captum's IntegratedGradients on the embedded ``codes`` (UNK baseline, trapezoid rule over
    ``steps + 1`` points, ``chunk`` rows per forward), summed over the embedding dim."""
    from captum.attr import IntegratedGradients as CaptumIG

    codes = data["codes"]
    embed = model.get_embedding_model()
    x = embed({"codes": codes})["codes"].detach()
    b = embed({"codes": torch.ones_like(codes)})["codes"].detach()
    mask = (codes != 0).int()
    ig = CaptumIG(lambda e, m: model.forward_from_embedding(codes=(e, m))["logit"][:, 0])
    return lambda: ig.attribute(x, baselines=b, additional_forward_args=(mask,), n_steps=steps + 1,
                                method="riemann_trapezoid", internal_batch_size=chunk).sum(-1)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference over the reference's largest magnitude (float64, on the CPU)."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def backends_here(device: str) -> list[str]:
    """fastattr backends worth timing here: Triton only where it compiles (CUDA)."""
    if device.startswith("cuda") and triton_available() and not interpreter_enabled():
        return ["torch", "triton"]
    return ["torch"]


def bench_case(length: int, steps: int, batch: int, layers: int, heads: int, dim: int, device: str,
               repeats: int, use_pyhealth: bool, use_captum: bool, long_tail: bool = False) -> list[dict[str, Any]]:
    """All methods of both workloads on one model and batch; rows ready for the CSV. With
    ``long_tail`` the patients have log-normal lengths (median ``length``) padded to the batch's
    longest (``seq_len`` then reports that padded length) and the workloads are named so."""
    model, data = build_model(length, batch, layers, heads, dim, device, use_pyhealth, long_tail=long_tail)
    suffix = " long-tailed" if long_tail else ""
    common = {"device": device, "model": "pyhealth.Transformer" if use_pyhealth else "fastattr.TransformerClassifier",
              "seq_len": data["codes"].shape[1], "steps": steps, "batch": batch, "layers": layers, "heads": heads,
              "dim": dim, "repeats": repeats, "torch": torch.__version__}
    ig = IntegratedGradients(model, steps=steps)
    base_ig, ig_base_name, base_ch, ch_base_name = case_baselines(model, data, steps, use_pyhealth)
    reference = base_ig()["codes"]
    fns: dict[str, Callable[[], Any]] = {ig_base_name: base_ig}
    errors = {ig_base_name: 0.0}
    for backend in backends_here(device):
        name = f"fastattr[{backend}]"
        fns[name] = lambda b=backend: ig.attribute(backend=b, **data)
        errors[name] = rel_err(fns[name]()["codes"], reference)
    if use_captum:
        ig.attribute(**data)
        run_captum = captum_ig(model, data, steps, ig.last_internal_batch_size)
        # Captum's trapezoid weights over n points are 1/n with halved ends (they sum to (n-1)/n);
        # fastattr's riemann_trapezoid uses 1/(n-1): the two differ by exactly that factor.
        trap = ig.attribute(method="riemann_trapezoid", **data)["codes"] * (steps / (steps + 1))
        errors["captum"] = rel_err(run_captum(), trap)
        fns["captum"] = run_captum
    for name, err in errors.items():
        if err > 1e-4:
            reference = "the trapezoid rule" if name == "captum" else ig_base_name
            raise AssertionError(f"IG: {name} differs from {reference} "
                                 f"by {err:.2e} (relative); refusing to time methods that disagree")
    rows = timed_rows(fns, errors, ig_base_name, "integrated_gradients" + suffix, common, repeats, device)

    chefer = CheferRelevance(model)
    reference = base_ch()["codes"]
    fns = {ch_base_name: base_ch}
    errors = {ch_base_name: 0.0}
    for backend in backends_here(device):
        name = f"fastattr[{backend}]"
        fns[name] = lambda b=backend: chefer.attribute(backend=b, **data)
        errors[name] = rel_err(fns[name]()["codes"], reference)
        if errors[name] > 1e-4:
            raise AssertionError(f"Chefer: {name} differs from {ch_base_name} by {errors[name]:.2e}")
    rows += timed_rows(fns, errors, ch_base_name, "chefer" + suffix, common, repeats, device)
    model.zero_grad(set_to_none=True)
    return rows


def case_baselines(model: Any, data: dict[str, torch.Tensor], steps: int,
                   use_pyhealth: bool) -> tuple[Callable[[], Any], str, Callable[[], Any], str]:
    """IG's and Chefer's baselines on one batch, each followed by its name: PyHealth's classes when
    PyHealth imports, else the algorithms as ``fastattr.loop`` restates them."""
    if use_pyhealth:
        from pyhealth.interpret.methods import CheferRelevance as PyHealthChefer
        from pyhealth.interpret.methods import IntegratedGradients as PyHealthIG

        pyhealth_ig, pyhealth_chefer = PyHealthIG(model), PyHealthChefer(model)
        return ((lambda: pyhealth_ig.attribute(steps=steps, **data)), "pyhealth",
                (lambda: pyhealth_chefer.attribute(**data)), "pyhealth")
    return ((lambda: step_loop_integrated_gradients(model, steps=steps, **data)), "step-loop",
            (lambda: full_chefer_relevance(model, **data)), "full-R-loop")


def timed_rows(fns: dict[str, Callable[[], Any]], errors: dict[str, float], base_name: str, workload: str,
               common: dict[str, Any], repeats: int, device: str) -> list[dict[str, Any]]:
    """``fns`` timed interleaved: one CSV row per method, with its speedup over ``base_name`` and
    its relative error from ``errors``."""
    stats = time_interleaved(fns, repeats, device)
    return [{**common, "workload": workload, "method": name, "baseline": base_name,
             "speedup_vs_baseline": stats[base_name]["median_ms"] / s["median_ms"],
             "max_rel_err": errors[name], **s} for name, s in stats.items()]


def user_call_rows(method: str, patients: int, layers: int, heads: int, dim: int, steps: int, device: str,
                   repeats: int, use_pyhealth: bool, median: int = 15, longest: int = 400,
                   seed: int = 0) -> list[dict[str, Any]]:
    """The three ways a PyHealth user calls an interpreter, with no options, over ``patients``
    long-tailed patients (log-normal lengths), with the loaders users make (PyHealth's
    ``get_dataloader`` when PyHealth imports): a loop over a batch-size-1 dataloader (PyHealth's
    docs recommend it for interpretability), a loop over batch size 32, and
    ``fastattr.attribute_dataset`` over the batch-32 loader with its defaults (against the baseline
    looping over that loader). Every fastattr row is checked patient by patient against the
    baseline (PyHealth when it imports, else ``fastattr.loop``) before anything is timed."""
    import tempfile

    from fastattr.cohort import attribute_dataset, load_attributions

    model, items, loader = cohort_loaders(patients, median, longest, layers, heads, dim, device, use_pyhealth, seed)
    ours, base, base_name = user_call_methods(method, model, steps, use_pyhealth)
    one, many = loader(1), loader(32)
    lengths = [int((it["codes"] != 0).sum()) if isinstance(it["codes"], torch.Tensor) else len(it["codes"])
               for it in items]

    def loop(fn, batches):
        return [fn(**b)["codes"] for b in batches]

    reference = {"batch-1 loop": loop(base, one), "batch-32 loop": loop(base, many)}
    errors = {name: max(rel_err(g, r) for g, r in zip(loop(ours.attribute, batches), reference[name], strict=False))
              for name, batches in (("batch-1 loop", one), ("batch-32 loop", many))}
    flat = [row for batch in reference["batch-32 loop"] for row in batch]
    with tempfile.TemporaryDirectory() as tmp:
        attribute_dataset(ours, many, tmp, progress=False)
        store = load_attributions(tmp)
        errors["attribute_dataset"] = max(rel_err(store[i]["attr/codes"][:n], flat[i][:n].cpu())
                                          for i, n in enumerate(lengths))
    for name, err in errors.items():
        if err > 1e-4:
            raise AssertionError(f"{method}: {name} differs from {base_name} by {err:.2e}; refusing to time it")

    def job():
        with tempfile.TemporaryDirectory() as tmp:
            attribute_dataset(ours, many, tmp, progress=False)
    common = {"device": device, "model": "pyhealth.Transformer" if use_pyhealth else "fastattr.TransformerClassifier",
              "seq_len": max(lengths), "steps": steps if method == "ig" else 0, "batch": patients, "layers": layers,
              "heads": heads, "dim": dim, "repeats": repeats, "torch": torch.__version__, "baseline": base_name}
    rows = []
    for name, theirs, batches in (("batch-1 loop", one, one), ("batch-32 loop", many, many),
                                  ("attribute_dataset", many, None)):
        stats = time_interleaved({"theirs": lambda b=theirs: loop(base, b),
                                  "ours": (lambda b=batches: loop(ours.attribute, b)) if batches is not None else job},
                                 repeats, device)
        for who, s in stats.items():
            rows.append({**common, "workload": f"{'integrated_gradients' if method == 'ig' else 'chefer'} "
                         f"as users call it: {name}", "method": base_name if who == "theirs" else "fastattr",
                         "speedup_vs_baseline": stats["theirs"]["median_ms"] / s["median_ms"],
                         "max_rel_err": 0.0 if who == "theirs" else errors[name], **s})
    return rows


def user_call_methods(method: str, model: Any, steps: int, use_pyhealth: bool) -> tuple[Any, Callable[..., Any], str]:
    """fastattr's interpreter for ``method`` (``"ig"``, else Chefer) with no options, then the
    baseline's ``attribute(**batch)`` and its name: PyHealth's when it imports, else ``fastattr.loop``'s."""
    if method == "ig":
        ours = IntegratedGradients(model, steps=steps)
        if use_pyhealth:
            from pyhealth.interpret.methods import IntegratedGradients as PyHealthIG

            return ours, PyHealthIG(model, steps=steps).attribute, "pyhealth"
        return ours, (lambda **b: step_loop_integrated_gradients(model, steps=steps, **b)), "step-loop"
    ours = CheferRelevance(model)
    if use_pyhealth:
        from pyhealth.interpret.methods import CheferRelevance as PyHealthChefer

        return ours, PyHealthChefer(model).attribute, "pyhealth"
    return ours, (lambda **b: full_chefer_relevance(model, **b)), "full-R-loop"


def write_plot(path: Path, rows: list[dict[str, Any]]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in rows if not r["workload"].endswith("long-tailed") and "as users call it" not in r["workload"]]
    workloads = sorted({r["workload"] for r in rows})
    fig, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 4), squeeze=False)
    for ax, workload in zip(axes[0], workloads, strict=False):
        here = [r for r in rows if r["workload"] == workload]
        for method in sorted({r["method"] for r in here}):
            points = sorted((r["seq_len"], r["speedup_vs_baseline"]) for r in here if r["method"] == method)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (codes)")
        ax.set_ylabel(f"speedup vs {here[0]['baseline']} (median)")
        ax.set_title(f"{workload} on {here[0]['device']}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(quick: bool = False, device: str | None = None, out: str | Path = "fastattr-bench",
        lengths: list[int] | None = None, steps: int | None = None, batch: int | None = None,
        layers: int | None = None, heads: int | None = None, dim: int | None = None,
        repeats: int | None = None, long_tail: bool = True, user_calls: bool = True) -> list[dict[str, Any]]:
    """Run the sweep over sequence lengths, then (``long_tail``) the long-tailed workload (a batch
    of 32 patients, log-normal lengths with median 15 codes, padded to the longest), then
    (``user_calls``) both methods as users call them (:func:`user_call_rows`: IG over 64
    long-tailed patients, Chefer over 256 with 4 layers; quick: 8 and 32); print the table, write
    ``bench.csv`` and ``bench.png``."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    lengths = lengths or ([16, 32] if quick else [32, 64, 128, 256])
    steps = steps or (8 if quick else 50)
    batch = batch or (4 if quick else 8)
    layers = layers or 2
    heads = heads or (2 if quick else 4)
    dim = dim or (32 if quick else 64)
    repeats = repeats or (2 if quick else 7)
    use_pyhealth = pyhealth_available()
    use_captum = importlib.util.find_spec("captum") is not None
    found = "found" if use_pyhealth else "not importable (baseline: fastattr.loop)"
    print(f"fastattr bench on {device}: PyHealth {found}, "
          f"Captum {'found' if use_captum else 'not importable'}; backends {', '.join(backends_here(device))}")
    rows = []
    for length in lengths:
        rows += bench_case(length, steps, batch, layers, heads, dim, device, repeats, use_pyhealth, use_captum)
    if long_tail:  # what users have: long-tailed lengths, padded to each batch's longest
        rows += bench_case(8 if quick else 15, steps, 8 if quick else 32, layers, heads, dim, device, repeats,
                           use_pyhealth, use_captum, long_tail=True)
    if user_calls:  # batch-1 loop, batch-32 loop, attribute_dataset with its defaults
        for method, patients, depth in (("ig", 8 if quick else 64, layers), ("chefer", 32 if quick else 256, 4)):
            rows += user_call_rows(method, patients, depth, heads, dim, steps, device, 1 if quick else 3, use_pyhealth,
                                   longest=64 if quick else 400)
    print("| workload | seq_len | method | median ms | min-max ms | speedup | peak MiB | rel. err |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workload']} | {r['seq_len']} | {r['method']} | {r['median_ms']:.1f} | "
              f"{r['min_ms']:.1f}-{r['max_ms']:.1f} | {r['speedup_vs_baseline']:.2f}x | {r['peak_mem_mb']:.1f} | "
              f"{r['max_rel_err']:.1e} |")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: r[k] for k in COLUMNS} for r in rows)
    png = write_plot(out / "bench.png", rows)
    print(f"wrote {out / 'bench.csv'}" + (f" and {out / 'bench.png'}" if png else " (install matplotlib for the plot)"))
    return rows
