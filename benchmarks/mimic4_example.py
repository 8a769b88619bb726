"""PyHealth's MIMIC-IV interpretability example, timed side by side: fastattr against PyHealth 2.1.0, with floors.

    python -P benchmarks/mimic4_example.py --patients 400 --repeats 3     # in tests/pyhealth_env.sh's environment

(or ``python -m benchmarks.mimic4_example ...`` from the repository root; run by path, this script appends the
root to ``sys.path`` so that ``benchmarks`` imports.)

The pipeline of PyHealth's ``examples/interpretability/mp_transformer_mimic4_interpret.py`` on generated
MIMIC-IV-shaped tables (``benchmarks/mimic4_tables.py``): ``MIMIC4Dataset`` with the example's five EHR tables,
``MortalityPredictionStageNetMIMIC4``, ``split_by_patient``, a test loader of 16, the example's
``Transformer(embedding_dim=128, heads=4, dropout=0.3, num_layers=3)`` briefly trained. Two models: as the example
builds it (``labs`` embedded by a Linear with a bias: its output depends on padding, so nothing is trimmed) and a
variant without that bias (it ignores padding: Chefer and the evaluator trim; IG's UNK baseline still turns padded
codes into data, so IG runs padded). Per model, over the whole test loader, every result checked equal first:

- attribution, IG (50 steps) and Chefer: PyHealth's class, fastattr's, and the floor: the model's own forward and
  input-gradient backward of every row the method must run, at the widths fastattr ran them (IG: the (steps + 1) x
  B rows of a batch in one call or in fastattr's chunks, whichever is faster; Chefer: one forward with attention
  hooks and its backward per length group);
- evaluation of the same attributions, ``Evaluator(percentages=[25, 50, 99]).evaluate`` batch by batch:
  PyHealth's, fastattr's, and the floor: one no-grad forward of as many rows as fastattr's evaluator ran
  (unablated + distinct ablated), at the batch's padded width.
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # appended: the installed packages come first

import fastattr  # noqa: E402
import fastattr.metrics  # noqa: E402
from benchmarks.mimic4_tables import write_mimic4_tables  # noqa: E402
from fastattr.demo.timing import time_interleaved  # noqa: E402
from fastattr.interpret.batches import select_samples  # noqa: E402
from fastattr.interpret.features import FeatureBatch  # noqa: E402
from fastattr.interpret.outputs import logits_of  # noqa: E402

TABLES = ["patients", "admissions", "diagnoses_icd", "procedures_icd", "labevents"]
PERCENTAGES = [25, 50, 99]


def build(patients: int, seed: int, out: Path):
    """The example's loaders and its two Transformers (as built, and without the ``labs`` bias), trained."""
    from pyhealth.datasets import MIMIC4Dataset, get_dataloader, split_by_patient
    from pyhealth.models import Transformer
    from pyhealth.tasks import MortalityPredictionStageNetMIMIC4

    root = write_mimic4_tables(out / "mimiciv" / "2.2", patients=patients, seed=seed)
    dataset = MIMIC4Dataset(ehr_root=str(root), ehr_tables=list(TABLES), cache_dir=str(out / "cache"), num_workers=1)
    samples = dataset.set_task(MortalityPredictionStageNetMIMIC4(), num_workers=1)
    train, _, test = split_by_patient(samples, [0.6, 0.1, 0.3], seed=233)
    train_loader = get_dataloader(train, batch_size=16, shuffle=True, seed=seed)
    test_loader = get_dataloader(test, batch_size=16, shuffle=False)
    models = {}
    for name, bias in (("as the example builds it (labs with a bias)", True), ("labs without a bias", False)):
        torch.manual_seed(seed)
        model = Transformer(dataset=samples, embedding_dim=128, heads=4, dropout=0.3, num_layers=3)
        if not bias:
            model.embedding_model.embedding_layers["labs"].bias = None
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        model.train()
        for _ in range(3):
            for batch in train_loader:
                optimizer.zero_grad()
                model(**batch)["loss"].backward()
                optimizer.step()
        models[name] = model.eval()
    return list(test_loader), models


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


def check_equal(ours: list[dict], theirs: list[dict], what: str, tolerance: float = 1e-5) -> float:
    worst = max(relative_error(o[k], t[k]) for o, t in zip(ours, theirs, strict=True) for k in t)
    if worst > tolerance:
        raise AssertionError(f"{what}: fastattr differs from PyHealth by {worst:.2e} (> {tolerance:g})")
    return worst


def groups_of(interpreter, batch) -> list[tuple[torch.Tensor, list[int] | None]]:
    """The length groups fastattr ran ``batch`` in (after a call on it), or the batch as given."""
    features = FeatureBatch.from_batch(interpreter.model, batch)
    if len(interpreter.last_groups) <= 1:
        return [(torch.arange(features.size), None)]
    return interpreter._lengths.plan(features, pack="auto", points=1, device=torch.device("cpu"),
                                     method=interpreter._lengths.method)


def gradient_floor(model, batches: list[dict], groups: list[list], repeat: int, hooks: bool,
                   chunks: list[int | None] | None):
    """The model's forward from its embeddings and the input-gradient backward of every row: each sample
    ``repeat`` times (IG's path points), per group at the group's widths, ``chunks[i]`` rows a call in batch
    ``i`` (fastattr's own chunk there: one call of every row is slower on a CPU), else all in one call;
    attention hooks on for Chefer."""
    embed = model.get_embedding_model()
    calls = []
    for i, (batch, batch_groups) in enumerate(zip(batches, groups, strict=True)):
        features = FeatureBatch.from_batch(model, batch)
        for index, sizes in batch_groups:
            everything = index.repeat(repeat)
            chunk = (chunks[i] if chunks else None) or len(everything)
            for start in range(0, len(everything), chunk):
                rows = features.subset(everything[start:start + chunk], sizes)
                with torch.no_grad():
                    embedded = {k: v.detach() for k, v in embed(rows.values()).items()}
                calls.append((rows, embedded))

    def run():
        if hooks:
            model.set_attention_hooks(True)
        try:
            for rows, embedded in calls:
                leaves = {k: v.clone().requires_grad_(True) for k, v in embedded.items()}
                logits = logits_of(model.forward_from_embedding(**rows.call(leaves)))
                torch.autograd.grad(logits[:, 0].sum(), list(leaves.values()))
        finally:
            if hooks:
                model.set_attention_hooks(False)
    return run


def attribution_rows(model, batches: list[dict], steps: int, repeats: int) -> list[str]:
    """IG and Chefer: PyHealth, fastattr and the floor, checked equal first."""
    from pyhealth.interpret.methods import CheferRelevance, IntegratedGradients

    rows = []
    for label, theirs_cls, ours_cls, repeat, hooks in (
            ("IG", IntegratedGradients, fastattr.IntegratedGradients, steps + 1, False),
            ("Chefer", CheferRelevance, fastattr.CheferRelevance, 1, True)):
        kwargs = {"steps": steps} if label == "IG" else {}
        theirs, ours = theirs_cls(model, **kwargs), ours_cls(model, **kwargs)
        ref = [theirs.attribute(**b) for b in batches]
        got, groups, chunks = [], [], []
        for b in batches:
            got.append(ours.attribute(**b))
            groups.append(groups_of(ours, b))
            chunks.append(getattr(ours, "last_internal_batch_size", None))
        worst = check_equal(got, ref, label)
        trimmed = sum(len(g) > 1 for g in groups)
        fns = {"pyhealth": lambda t=theirs: [t.attribute(**b) for b in batches],
               "fastattr": lambda o=ours: [o.attribute(**b) for b in batches],
               "floor": gradient_floor(model, batches, groups, repeat, hooks, None)}
        if any(chunks):  # IG's rows also in fastattr's own chunks, batch by batch: the floor is the faster of the two
            fns["floor in fastattr's chunks"] = gradient_floor(model, batches, groups, repeat, hooks, chunks)
        stats = time_interleaved(fns, repeats, "cpu")
        rows.append(row(label, stats, f"rel. err {worst:.1e}; {trimmed}/{len(batches)} batches trimmed"))
    return rows


def evaluation_row(model, batches: list[dict], attributions: list[dict], repeats: int) -> str:
    """The evaluator on the same attributions: PyHealth, fastattr and a no-grad forward of as many rows."""
    from pyhealth.metrics.interpretability import Evaluator

    theirs, ours = Evaluator(model, percentages=PERCENTAGES), fastattr.metrics.Evaluator(model, percentages=PERCENTAGES)
    worst, rows_run = 0.0, []
    for b, a in zip(batches, attributions, strict=True):
        ref, got = theirs.evaluate(b, a, return_per_percentage=True), ours.evaluate(b, a, return_per_percentage=True)
        worst = max([worst] + [float((got[m][p] - ref[m][p]).abs().max()) for m in ref for p in ref[m]])
        rows_run.append(len(b["mortality"]) + ours.metrics["comprehensiveness"].scorer.last_rows)
    if worst > 1e-6:
        raise AssertionError(f"evaluator: fastattr differs from PyHealth by {worst:.2e} (> 1e-6)")
    stacked = [select_samples(b, torch.arange(len(b["mortality"])).repeat(n)[:n]) for b, n in zip(batches, rows_run,
                                                                                                   strict=True)]

    def floor():
        with torch.no_grad():
            for s in stacked:
                model(**s)
    pairs = list(zip(batches, attributions, strict=True))
    stats = time_interleaved({"pyhealth": lambda: [theirs.evaluate(b, a) for b, a in pairs],
                              "fastattr": lambda: [ours.evaluate(b, a) for b, a in pairs],
                              "floor": floor}, repeats, "cpu")
    return row("Evaluator (IG's attributions)", stats, f"max abs diff {worst:.1e}; {sum(rows_run)} rows")


def row(label: str, stats: dict, note: str) -> str:
    p, f = stats["pyhealth"]["median_ms"], stats["fastattr"]["median_ms"]
    fl = min(v["median_ms"] for k, v in stats.items() if k.startswith("floor"))
    return (f"| {label} | {p:.0f} | {f:.0f} | {fl:.0f} | {p / f:.2f}x | {fl / f:.0%} | {note} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        batches, models = build(args.patients, args.seed, Path(tmp))
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [len(b["mortality"]) for b in batches]
    print(f"# MIMIC-IV example, {args.patients} patients (seed {args.seed}): {len(batches)} test batches {sizes}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print("| method | PyHealth ms | fastattr ms | floor ms | speedup | fastattr at % of floor speed | checks |")
    print("|---|---|---|---|---|---|---|")
    for name, model in models.items():
        report = fastattr.check_padding(model, batches[0])
        print(f"| **{name}**: check_padding {'ignores padding' if report.ignores_padding else report.features} "
              "| | | | | | |")
        for line in attribution_rows(model, batches, args.steps, args.repeats):
            print(line)
        ig = fastattr.IntegratedGradients(model, steps=args.steps)
        print(evaluation_row(model, batches, [ig.attribute(**b) for b in batches], args.repeats))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
