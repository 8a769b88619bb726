"""The real PyHealth 2.1.0 on a machine that cannot install it: fastattr against PyHealth's own
``IntegratedGradients``, ``CheferRelevance`` and models, in one process, checked equal before
anything is timed (the check is the proof that PyHealth's code ran).

    # here, in the PyHealth environment (tests/pyhealth_env.sh): build the cases and the carry folder
    python -m benchmarks.pyhealth_device prepare --out .carry
    # on the device (or here, as a dry run that hides what the device lacks):
    python -m benchmarks.pyhealth_device run --carry .carry --device cuda [--parts ig chefer loops precision]
    python -m benchmarks.pyhealth_device run --carry .carry --device cpu --as-device   # the CPU dry run

What travels (``--carry``, a folder passed to the device tool's ``carry``): PyHealth's wheel
(pure Python, 0.8 MB) and ``cases.pt``: each model's class, arguments and weights, its dataset's
schemas and processors (pickled PyHealth objects), its samples and batches, collated here by
PyHealth's own collate function. Datasets are built here because building them needs what the
device lacks (polars, litdata, dask...); nothing timed uses them.

PyHealth's package ``__init__`` files import every dataset, model and interpreter it has, and with
them polars, dask, litdata, mne, rdkit, pydantic, shap... The timed code needs none of it, so
:func:`import_pyhealth` loads only the modules the cases use, from the real files, and puts in
place of each package ``__init__`` and each missing third-party module a stub that raises if it is
ever used (``STUBS`` names each one and why it is safe). Timings are medians of interleaved
repeats in one run (CUDA events on a GPU).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import platform
import random
import subprocess
import sys
import tempfile
import types
import zipfile
from pathlib import Path
from typing import Any

import torch

# The package __init__ files bypassed, and third-party modules replaced by a stub where the
# machine lacks them: name -> why nothing the cases run touches it.
STUBS = {
    "pyhealth.datasets": "its __init__ imports every dataset (polars, litdata, dask, mne); the cases were built "
                         "off the device, the models only name SampleDataset in annotations, and only the real "
                         "pyhealth.datasets.utils (PyHealth's collate function) is loaded from it",
    "pyhealth.models": "its __init__ imports every model (rdkit and more for drug recommendation); the timed models "
                       "load from their own modules",
    "pyhealth.interpret": "its __init__ imports the visualisation utilities (matplotlib) and every method",
    "pyhealth.interpret.methods": "its __init__ imports every interpreter (SHAP, LIME, DeepLift...); IG and Chefer "
                                  "load from their own modules",
    "litdata": "imported at the top of pyhealth/datasets/utils.py for its streaming helpers (one signature names "
               "litdata.StreamingDataset, a placeholder class here); the collate function used here does not call it",
    "orjson": "imported by pyhealth/processors/cehr_processor.py; no case uses a CEHR processor",
    "PIL": "imported by PyHealth's image processors; no case has an image",
}
# Third-party modules the device image lacks (hidden in the CPU dry run to find every stub needed).
DEVICE_LACKS = ("polars", "dask", "distributed", "litdata", "mne", "rdkit", "pydantic", "pydantic_core", "orjson",
                "more_itertools", "platformdirs", "accelerate", "boto3", "botocore", "shap", "lime")
METHOD_MODULES = {"IntegratedGradients": "integrated_gradients", "CheferRelevance": "chefer",
                  "ShapExplainer": "shap", "LimeExplainer": "lime", "IntegratedGradientGIM": "ig_gim"}
MODEL_MODULES = {"Transformer": "pyhealth.models.transformer", "StageNet": "pyhealth.models.stagenet",
                 "MLP": "pyhealth.models.mlp", "StageAttentionNet": "pyhealth.models.stagenet_mha"}


class Stub(types.ModuleType):
    """A module that only says why it is not there, the moment anything is read from it."""

    def __init__(self, name: str, reason: str, path: list[str] | None = None, **attributes: Any) -> None:
        super().__init__(name)
        self.__dict__["_reason"] = reason
        if path is not None:
            self.__path__ = path  # a package: its real submodules still load from its folder
        self.__dict__.update(attributes)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise RuntimeError(f"{self.__name__}.{attr} was used, but {self.__name__} is a stub here: {self._reason}")


def import_pyhealth(site: Path | None = None) -> types.SimpleNamespace:
    """PyHealth's interpreters, models and collate function, loaded module by module (see STUBS)."""
    if site is not None:
        sys.path.insert(0, str(site))
    spec = importlib.util.find_spec("pyhealth")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("PyHealth is neither installed nor carried (run `prepare` and pass --carry)")
    root = Path(list(spec.submodule_search_locations)[0])
    for name in ("litdata", "orjson", "PIL"):
        if importlib.util.find_spec(name) is None:
            # litdata.StreamingDataset is named in a signature's annotation, evaluated at import
            sys.modules[name] = Stub(name, STUBS[name], **({"StreamingDataset": type("StreamingDataset", (), {})}
                                                           if name == "litdata" else {}))
    import pyhealth  # its own __init__ only sets up logging and a cache folder

    class SampleDataset:  # what the model modules annotate with
        pass
    for name in ("pyhealth.datasets", "pyhealth.models", "pyhealth.interpret", "pyhealth.interpret.methods"):
        folder = root.joinpath(*name.split(".")[1:])
        module = Stub(name, STUBS[name], path=[str(folder)],
                      **({"SampleDataset": SampleDataset} if name == "pyhealth.datasets" else {}))
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        setattr(sys.modules[parent], child, module)
    models = sys.modules["pyhealth.models"]
    models.BaseModel = importlib.import_module("pyhealth.models.base_model").BaseModel
    classes = {name: getattr(importlib.import_module(path), name) for name, path in MODEL_MODULES.items()}
    methods = {name: getattr(importlib.import_module(f"pyhealth.interpret.methods.{module}"), name)
               for name, module in METHOD_MODULES.items()}
    collate = importlib.import_module("pyhealth.datasets.utils").collate_fn_dict_with_padding
    return types.SimpleNamespace(version=pyhealth.__version__, root=root, models=classes, collate=collate, **methods)


# -- prepare (in the PyHealth environment) ----------------------------------------------------------

def _long_tailed_samples(patients: int, median: int, longest: int, seed: int) -> list[dict]:
    from fastattr.demo.synthetic import long_tailed_lengths

    rng = random.Random(seed)
    return [{"patient_id": f"p{i}", "visit_id": "v", "label": i % 2,
             "codes": [f"c{rng.randrange(500)}" for _ in range(n)]}
            for i, n in enumerate(long_tailed_lengths(patients, median=median, longest=longest, seed=seed))]


def _case(name: str, raw: list[dict], model: str, kwargs: dict, batch: int, seed: int) -> dict:
    """A model of PyHealth's on a dataset built here, as what the device needs to rebuild and run it."""
    import pyhealth.models
    from pyhealth.datasets import create_sample_dataset, get_dataloader
    from pyhealth.datasets.utils import collate_fn_dict_with_padding

    dataset = create_sample_dataset(samples=raw, input_schema={"codes": "sequence"},
                                    output_schema={"label": "binary"}, dataset_name=f"{name}-{seed}")
    torch.manual_seed(seed)
    net = getattr(pyhealth.models, model)(dataset=dataset, **kwargs).eval()
    samples = [dataset[i] for i in range(len(dataset))]
    loader = get_dataloader(dataset, batch_size=batch, shuffle=False)
    batches = list(loader)
    assert batches[0]["codes"].shape == collate_fn_dict_with_padding(samples[:batch])["codes"].shape
    return {"name": name, "model": model, "kwargs": kwargs, "state_dict": net.state_dict(),
            "input_schema": dict(dataset.input_schema), "output_schema": dict(dataset.output_schema),
            "input_processors": dict(dataset.input_processors), "output_processors": dict(dataset.output_processors),
            "samples": samples, "batch_size": batch}


def prepare(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cases = {
        # IG: Transformer 2L/4H/d128, 100 codes per patient, batches of 32 (issue 19's target workload)
        "ig": _case("ig", [{"patient_id": f"p{i}", "visit_id": "v", "label": i % 2,
                            "codes": [f"c{random.Random(i).randrange(500)}" for _ in range(100)]} for i in range(32)],
                    "Transformer", dict(embedding_dim=128, heads=4, num_layers=2), 32, seed=0),
        # long-tailed cohorts (log-normal lengths, median 15, at most 400): IG 2 layers, Chefer 4 layers, d64
        "ig-tail": _case("ig-tail", _long_tailed_samples(512, 15, 400, 0), "Transformer",
                         dict(embedding_dim=64, heads=4, num_layers=2), 32, seed=0),
        "chefer-tail": _case("chefer-tail", _long_tailed_samples(512, 15, 400, 0), "Transformer",
                             dict(embedding_dim=64, heads=4, num_layers=4), 32, seed=0),
        # SHAP, LIME, IG-GIM: PyHealth's interpretability example's Transformer (3L/4H/d128), 32 long-tailed patients
        "methods": _case("methods", _long_tailed_samples(32, 15, 120, 1), "Transformer",
                         dict(embedding_dim=128, heads=4, num_layers=3), 32, seed=0),
    }
    torch.save(cases, out / "cases.pt")
    wheels = list(out.glob("pyhealth-2.1.0-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "pyhealth==2.1.0", "--no-deps",
                        "--only-binary=:all:", "--python-version", "3.12", "-d", str(out)], check=True)
    size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))} ({size:.1f} MiB)")


# -- run (on the device) ---------------------------------------------------------------------------------

def _unpack(carry: Path) -> Path:
    wheel = next(carry.glob("pyhealth-2.1.0-*.whl"), None)
    if wheel is None:
        raise FileNotFoundError(f"{carry} holds no PyHealth wheel: run `prepare --out {carry}` first")
    site = Path(tempfile.mkdtemp(prefix="pyhealth-site-"))
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    return site


def _build(ph: types.SimpleNamespace, case: dict, device: str):
    """The case's PyHealth model on ``device``, its samples and PyHealth-collated loaders."""
    dataset = types.SimpleNamespace(input_schema=case["input_schema"], output_schema=case["output_schema"],
                                    input_processors=case["input_processors"],
                                    output_processors=case["output_processors"])
    model = ph.models[case["model"]](dataset=dataset, **case["kwargs"])
    model.load_state_dict(case["state_dict"])
    model = model.to(device).eval()
    samples = case["samples"]

    class Samples(torch.utils.data.Dataset):
        def __len__(self):
            return len(samples)

        def __getitem__(self, i):
            return samples[i]

    def loader(batch: int):
        return torch.utils.data.DataLoader(Samples(), batch_size=batch, shuffle=False, collate_fn=ph.collate)
    return model, Samples(), loader


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _check(name: str, ours: dict, theirs: dict, tolerance: float) -> float:
    worst = 0.0
    for key, ref in theirs.items():
        got = ours[key]
        if got.shape != ref.shape:
            raise AssertionError(f"{name}: {key} has shape {tuple(got.shape)}, PyHealth's {tuple(ref.shape)}")
        worst = max(worst, _rel(got, ref))
    if worst > tolerance:
        raise AssertionError(f"{name}: fastattr differs from PyHealth by {worst:.2e} (> {tolerance:g})")
    return worst


def run(args) -> None:
    import fastattr
    from fastattr.cohort import attribute_dataset, load_attributions
    from fastattr.demo.timing import time_interleaved

    site = _unpack(Path(args.carry))
    ph = import_pyhealth(site)
    cases = torch.load(Path(args.carry) / "cases.pt", weights_only=False)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"device {args.device} ({name}), torch {torch.__version__}, PyHealth {ph.version} from {ph.root} "
          f"(loaded module by module; stubs: "
          f"{', '.join(sorted(m for m in STUBS if isinstance(sys.modules.get(m), Stub)))})")
    tolerance = 1e-4 if args.device.startswith("cuda") else 1e-5

    def timed(fns: dict, repeats: int) -> dict:
        stats = time_interleaved(fns, repeats, args.device)
        return {k: v["median_ms"] for k, v in stats.items()}

    if "ig" in args.parts:
        model, _, loader = _build(ph, cases["ig"], args.device)
        batch = next(iter(loader(32)))
        theirs = ph.IntegratedGradients(model, steps=50)
        ours = fastattr.IntegratedGradients(model, steps=50)
        err = _check("IG", ours.attribute(**batch), theirs.attribute(**batch), tolerance)
        fns = {"PyHealth 2.1.0": lambda: theirs.attribute(**batch)}
        for mode in args.modes:
            fns[f"fastattr {mode}"] = lambda mode=mode: ours.attribute(precision=mode, **batch)
        ms = timed(fns, args.repeats)
        print(f"\nIG, PyHealth Transformer 2L/4H/d128, 100 codes, batch 32, steps 50 (max rel. err. fp32 vs PyHealth "
              f"{err:.1e})\n| method | median ms | vs PyHealth |\n|---|---|---|")
        for k, v in ms.items():
            print(f"| {k} | {v:.2f} | {ms['PyHealth 2.1.0'] / v:.2f}x |", flush=True)

    if "methods" in args.parts:
        run_methods(ph, cases["methods"], args, timed)

    for method in [m for m in ("ig", "chefer") if f"{m}-loops" in args.parts or "loops" in args.parts]:
        case = cases[f"{method}-tail"]
        model, samples, _ = _build(ph, case, args.device)
        theirs = (ph.IntegratedGradients(model, steps=50) if method == "ig" else ph.CheferRelevance(model)).attribute
        ours = (fastattr.IntegratedGradients(model, steps=50) if method == "ig" else fastattr.CheferRelevance(model))
        count = len(samples) if method == "chefer" else min(args.ig_patients, len(samples))
        subset = torch.utils.data.Subset(samples, range(count))
        loader32 = torch.utils.data.DataLoader(subset, batch_size=32, shuffle=False, collate_fn=ph.collate)
        one = list(torch.utils.data.DataLoader(subset, batch_size=1, shuffle=False, collate_fn=ph.collate))
        many = list(loader32)

        def loop(fn, batches):
            return [fn(**b)["codes"] for b in batches]
        worst = max(_check(f"{method} batch-1", {"codes": g}, {"codes": r}, tolerance)
                    for g, r in zip(loop(ours.attribute, one), loop(theirs, one), strict=False))
        ref = loop(theirs, many)
        worst = max(worst, max(_check(f"{method} batch-32", {"codes": g}, {"codes": r}, tolerance)
                               for g, r in zip(loop(ours.attribute, many), ref, strict=False)))
        with tempfile.TemporaryDirectory() as tmp:
            attribute_dataset(ours, loader32, tmp, progress=False)
            store = load_attributions(tmp)
            flat = [row for b in ref for row in b]
            for i, row in enumerate(flat):
                got = store[i]["attr/codes"]
                n = min(len(got), len(row))
                worst = max(worst, _check(f"{method} attribute_dataset", {"codes": got[:n]}, {"codes": row[:n].cpu()},
                                          tolerance))

        def job():
            with tempfile.TemporaryDirectory() as tmp:
                attribute_dataset(ours, loader32, tmp, progress=False)
        print(f"\n{method}: {count} long-tailed patients (median 15 codes, at most 400), PyHealth Transformer "
              f"{case['kwargs']['num_layers']}L/4H/d64 (max rel. err. {worst:.1e})\n"
              "| how the user calls it | PyHealth | fastattr | speedup |\n|---|---|---|---|")
        for row, (a, b) in {"batch-1 loop": (lambda: loop(theirs, one), lambda: loop(ours.attribute, one)),
                            "batch-32 loop": (lambda: loop(theirs, many), lambda: loop(ours.attribute, many)),
                            "attribute_dataset, defaults (vs the PyHealth batch-32 loop)": (lambda: loop(theirs, many),
                                                                                            job)}.items():
            ms = timed({"theirs": a, "ours": b}, args.loop_repeats)
            print(f"| {row} | {ms['theirs']:.1f} ms | {ms['ours']:.1f} ms | {ms['theirs'] / ms['ours']:.2f}x |",
                  flush=True)


def run_methods(ph: types.SimpleNamespace, case: dict, args: argparse.Namespace, timed: Any) -> None:
    """SHAP, LIME and IG-GIM on one batch of 32 (PyHealth's example Transformer): checked, then timed."""
    import fastattr

    model, _, loader = _build(ph, case, args.device)
    batch = next(iter(loader(32)))
    cuda = args.device.startswith("cuda")
    rows = {  # label: (PyHealth's, fastattr's, tolerance: SHAP's float32 fit amplifies the logits' rounding ~1,000x)
        "ShapExplainer, 200 coalitions": (ph.ShapExplainer(model, max_coalitions=200),
                                          fastattr.ShapExplainer(model, max_coalitions=200), 1e-3 if cuda else 1e-4),
        "LimeExplainer, 200 perturbations": (ph.LimeExplainer(model, n_samples=200),
                                             fastattr.LimeExplainer(model, n_samples=200), 1e-4),
        "IntegratedGradientGIM, 50 steps": (ph.IntegratedGradientGIM(model, steps=50),
                                            fastattr.IntegratedGradientGIM(model, steps=50), 1e-4 if cuda else 1e-5),
    }
    print("\nSHAP, LIME, IG-GIM: PyHealth Transformer 3L/4H/d128, 32 long-tailed patients in one batch\n"
          "| method | max rel. err. | PyHealth ms | fastattr ms | speedup |\n|---|---|---|---|---|")
    for label, (theirs, ours, tolerance) in rows.items():
        err = _check(label, ours.attribute(**batch), theirs.attribute(**batch), tolerance)
        ms = timed({"theirs": lambda t=theirs: t.attribute(**batch), "ours": lambda o=ours: o.attribute(**batch)},
                   max(1, args.repeats // 5))
        print(f"| {label} | {err:.1e} | {ms['theirs']:.1f} | {ms['ours']:.1f} | {ms['theirs'] / ms['ours']:.2f}x |",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("prepare", help="build cases.pt and fetch PyHealth's wheel (in the PyHealth environment)")
    p.add_argument("--out", default=".carry")
    r = sub.add_parser("run", help="fastattr against the real PyHealth, checked, then timed")
    r.add_argument("--carry", default=".carry")
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    r.add_argument("--parts", nargs="+", default=["ig", "loops"],
                   choices=["ig", "loops", "ig-loops", "chefer-loops", "methods"])
    r.add_argument("--modes", nargs="+", default=["fp32", "tf32", "bf16"])
    r.add_argument("--repeats", type=int, default=10)
    r.add_argument("--loop-repeats", type=int, default=3)
    r.add_argument("--ig-patients", type=int, default=128, help="patients of the IG loops (Chefer's: all 512)")
    r.add_argument("--as-device", action="store_true",
                   help="CPU dry run: hide the installed PyHealth's dependencies that the device lacks")
    args = parser.parse_args()
    if args.what == "prepare":
        prepare(Path(args.out))
        return
    if args.as_device:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from without_extras import hide

        hide(DEVICE_LACKS)
    run(args)


if __name__ == "__main__":
    main()
