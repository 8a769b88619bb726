"""``fastattr demo``: train a small Transformer on a synthetic cohort with planted truth, explain
held-out patients with IG and Chefer, and score the explanations against that truth."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fastattr.cohort import attribute_dataset
from fastattr.demo.models import FeatureProcessor, FeatureSpec, TransformerClassifier, save_checkpoint
from fastattr.demo.synthetic import CohortDataset, SyntheticCohort
from fastattr.demo.timing import time_interleaved
from fastattr.interpret.attention.chefer import CheferRelevance
from fastattr.interpret.gradient.ig import IntegratedGradients
from fastattr.loop import step_loop_integrated_gradients
from fastattr.report.figures import missing_extras
from fastattr.report.page import write_report
from fastattr.report.scores import evaluate_run


def train(model: torch.nn.Module, cohort: SyntheticCohort, train_idx: list[int], updates: int,
          device: torch.device, seed: int) -> float:
    """Adam on minibatches of 64 for ``updates`` steps; returns the last loss."""
    g = torch.Generator().manual_seed(seed)
    data = cohort.batch(train_idx)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(updates), desc="training", unit="batch", leave=False, disable=None):
        pick = torch.randint(0, len(train_idx), (64,), generator=g)
        loss = model(codes=data["codes"][pick].to(device), label=data["label"][pick].to(device))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return loss.item()


def present_truth(cohort: SyntheticCohort, codes: set[int]) -> set[int]:
    """Causal codes acting in this patient: planted codes present, and pairs with both present."""
    truth = cohort.truth
    acting = {c for c in truth.planted if c in codes}
    return acting | {c for pair in truth.pairs if set(pair) <= codes for c in pair}


def ranked_codes(attribution: torch.Tensor, codes: torch.Tensor) -> list[int]:
    """Distinct codes of one patient, best first, each scored by its largest attribution."""
    best: dict[int, float] = {}
    for code, score in zip(codes.tolist(), attribution.tolist(), strict=False):
        if code and score > best.get(code, float("-inf")):
            best[code] = score
    return sorted(best, key=best.get, reverse=True)


def recovery(attributions: torch.Tensor, codes: torch.Tensor, truths: list[set[int]]) -> dict[str, float]:
    top1 = top3 = 0
    for row, patient, truth in zip(attributions, codes, truths, strict=False):
        order = ranked_codes(row, patient)
        top1 += order[0] in truth
        top3 += bool(truth & set(order[:3]))
    return {"top1": top1 / len(truths), "top3": top3 / len(truths)}


def run(patients: int = 2000, seed: int = 0, steps: int = 50, updates: int = 600, explain: int = 32,
        device: str | None = None, out: str | Path = "fastattr-demo", repeats: int = 3, show: int = 6,
        save_model: str | Path | None = None) -> dict:
    """Run the demo, print its report, write the pictures and return the measured numbers."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cohort = SyntheticCohort(patients=patients, seed=seed)
    split = int(0.8 * patients)
    model, accuracy = _trained(cohort, split, updates, dev, seed, save_model)
    ig, chefer = IntegratedGradients(model, steps=steps), CheferRelevance(model)
    results = {"accuracy": accuracy, **_recovery_table(model, cohort, split, ig, chefer, explain, dev, seed, steps)}
    results.update(_speed_line(model, cohort, ig, steps, repeats, dev, seed))
    runs = _cohort_runs(cohort, split, ig, chefer, out)
    results["faithfulness"] = _faithfulness_table(model, runs)
    missing = missing_extras()
    report = None if missing else write_report(
        [runs["ig"], runs["chefer"]], out / "report.html", labels=["IG", "Chefer"], patients=show,
        title=f"fastattr demo: {patients - split} held-out patients, IG and Chefer")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    if report is None:
        print(f"wrote {out / 'results.json'}; the HTML report and the tables need {', '.join(missing)}: "
              'pip install "fastattr[report]", then fastattr report ' f"{runs['ig']} {runs['chefer']}")
    else:
        print(f"wrote {out / 'results.json'} and the report {report}")
    return results


def _trained(cohort: SyntheticCohort, split: int, updates: int, dev: torch.device, seed: int,
             save_model: str | Path | None) -> tuple[TransformerClassifier, float]:
    """The demo's Transformer trained on the first ``split`` patients, and its held-out accuracy."""
    spec = FeatureSpec({"codes": FeatureProcessor(token=True, size=len(cohort.names))}, {"label": "binary"})
    model = TransformerClassifier(spec, num_classes=2, dim=32, heads=2, layers=2).to(dev)
    start = time.perf_counter()
    loss = train(model, cohort, list(range(split)), updates, dev, seed)
    train_s = time.perf_counter() - start
    if save_model is not None:
        save_checkpoint(model, save_model, cohort={"seed": seed, "vocab": cohort.vocab})
    test = cohort.batch(range(split, cohort.patients))
    with torch.no_grad():
        prob = model(codes=test["codes"].to(dev))["y_prob"].squeeze(1).cpu()
    accuracy = ((prob > 0.5).long() == test["label"]).float().mean().item()
    pairs = cohort.truth.pairs.items()
    print(f"cohort: {cohort.patients} patients (seed {seed}); planted codes "
          f"{', '.join(f'{cohort.names[c]} (+{e:.1f})' for c, e in cohort.truth.planted.items())}; planted pairs "
          f"{', '.join(f'{cohort.names[a]}&{cohort.names[b]} (+{e:.1f})' for (a, b), e in pairs)}; "
          f"distractors {', '.join(cohort.names[d] for d in cohort.truth.distractors)}")
    print(f"trained {updates} updates in {train_s:.1f} s (last loss {loss:.3f}); held-out accuracy {accuracy:.3f}")
    return model, accuracy


def _recovery_table(model: torch.nn.Module, cohort: SyntheticCohort, split: int, ig: IntegratedGradients,
                    chefer: CheferRelevance, explain: int, dev: torch.device, seed: int, steps: int) -> dict:
    """How often each method ranks a planted code first / in the top 3, on held-out patients the
    model calls positive that carry acting planted truth (there the truth is what the model should use)."""
    test = cohort.batch(range(split, cohort.patients))
    codes = test["codes"].to(dev)
    with torch.no_grad():
        prob = model(codes=codes)["y_prob"].squeeze(1).cpu()
    truths = [present_truth(cohort, set(row.tolist())) for row in test["codes"]]
    chosen = [i for i in range(len(truths)) if truths[i] and prob[i] > 0.5][:explain]
    if not chosen:
        raise RuntimeError("no held-out patient is predicted positive with a planted code; train longer (--updates)")
    batch = {"codes": codes[chosen]}
    truth_rows = [truths[i] for i in chosen]
    ig_attr = ig.attribute(**batch)["codes"].detach()
    attributions = {"ig": ig_attr, "chefer": chefer.attribute(**batch)["codes"].detach(),
                    "random": torch.rand(ig_attr.shape, generator=torch.Generator().manual_seed(seed)).to(dev)}
    scores = {name: recovery(attr.cpu(), batch["codes"].cpu(), truth_rows) for name, attr in attributions.items()}
    print(f"\nexplained {len(chosen)} held-out patients predicted positive that carry planted truth "
          f"(IG steps={steps}):")
    print("| method | planted code ranked first | planted code in top 3 |")
    print("|---|---|---|")
    for name, s in scores.items():
        print(f"| {name} | {s['top1']:.0%} | {s['top3']:.0%} |")
    return {"patients_explained": len(chosen), "recovery": scores}


def _speed_line(model: torch.nn.Module, cohort: SyntheticCohort, ig: IntegratedGradients, steps: int, repeats: int,
                dev: torch.device, seed: int) -> dict:
    """IG against the one-step-at-a-time loop on what users have: 32 patients of long-tailed length
    (log-normal, median 15 codes) padded to the batch's longest, same generator and vocabulary."""
    tail = SyntheticCohort(patients=32, seed=seed + 1, vocab=cohort.vocab, lengths="lognormal", median_codes=15,
                           longest=256).batch(range(32), pad_to_longest=True)
    tail = {"codes": tail["codes"].to(dev)}
    tail_lengths = (tail["codes"] != 0).sum(1).float()
    timing = time_interleaved({"fastattr": lambda: ig.attribute(**tail),
                               "loop": lambda: step_loop_integrated_gradients(model, steps=steps, **tail)},
                              repeats, dev.type)
    fast, loop = timing["fastattr"]["median_ms"] / 1e3, timing["loop"]["median_ms"] / 1e3
    print(f"\nIG speed on {dev.type}, 32 patients of long-tailed length (median {tail_lengths.median():.0f} codes, "
          f"longest {tail_lengths.max():.0f}, padded to it), {steps} steps, median of {repeats} interleaved after a "
          f"warm-up: fastattr {fast * 1e3:.0f} ms, one-step-at-a-time loop {loop * 1e3:.0f} ms: "
          f"{loop / fast:.2f}x faster")
    return {"ig_fastattr_s": fast, "ig_loop_s": loop, "speedup": loop / fast, "device": dev.type,
            "speed_batch": {"patients": 32, "median_codes": tail_lengths.median().item(),
                            "longest": int(tail_lengths.max()), "padded_to": tail["codes"].shape[1]}}


def _cohort_runs(cohort: SyntheticCohort, split: int, ig: IntegratedGradients, chefer: CheferRelevance,
                 out: Path) -> dict[str, Path]:
    """Every held-out patient attributed with both methods to a run folder (the path to tables,
    summaries, faithfulness scores and the report)."""
    held_out = CohortDataset(cohort, range(split, cohort.patients))
    runs = {}
    for name, interpreter in (("ig", ig), ("chefer", chefer)):
        runs[name] = out / "runs" / name
        shutil.rmtree(runs[name], ignore_errors=True)  # the demo's own folder: never resume another model's run
        loader = torch.utils.data.DataLoader(held_out, batch_size=64, collate_fn=CohortDataset.collate)
        attribute_dataset(interpreter, loader, runs[name], vocab={"codes": cohort.names},
                          annotations=cohort.annotations(), progress=None)
    print(f"\nattributed the {len(held_out)} held-out patients with IG and Chefer: {runs['ig']}, {runs['chefer']} "
          f"(fastattr summarize / export / evaluate RUN)")
    return runs


def _faithfulness_table(model: torch.nn.Module, runs: dict[str, Path]) -> dict:
    """PyHealth's comprehensiveness and sufficiency of every held-out patient of both runs (each on
    its own codes; under the default filter, the patients predicted positive), beside a random
    attribution of the same patients."""
    table = {}
    for name, run in runs.items():
        rows = evaluate_run(run, model, progress=None).all()
        valid = rows["valid"]
        table[name] = {m: rows[m][valid].mean().item() for m in ("comprehensiveness", "sufficiency")}
        table["random"] = {m: rows[f"random/{m}"][valid].mean(1).mean().item()
                           for m in ("comprehensiveness", "sufficiency")}
        table["scored"] = int(valid.sum())
    print(f"\nfaithfulness of every held-out patient's attributions ({table['scored']} of {len(valid)} scored: "
          "predicted positive; each on its own codes; fastattr evaluate RUN):")
    print("| method | comprehensiveness (higher better) | sufficiency (lower better) |")
    print("|---|---|---|")
    for name in ("ig", "chefer", "random"):
        print(f"| {name} | {table[name]['comprehensiveness']:.3f} | {table[name]['sufficiency']:.3f} |")
    return table
