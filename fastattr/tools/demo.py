"""``fastattr demo``: train a small Transformer on a synthetic cohort with planted truth, explain
held-out patients with IG and Chefer, and score the explanations against that truth."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fastattr.tools.bench import time_interleaved
from fastattr.tools.cohort import CohortDataset, attribute_dataset
from fastattr.tools.report import missing_extras, write_report
from fastattr.interpret.chefer import CheferRelevance
from fastattr.tools.faithfulness import comprehensiveness, sufficiency
from fastattr.interpret.ig import IntegratedGradients
from fastattr.loop import step_loop_integrated_gradients
from fastattr.tools.models import FeatureProcessor, FeatureSpec, TransformerClassifier, save_checkpoint
from fastattr.tools.synthetic import SyntheticCohort


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
    for code, score in zip(codes.tolist(), attribution.tolist()):
        if code and score > best.get(code, float("-inf")):
            best[code] = score
    return sorted(best, key=best.get, reverse=True)


def recovery(attributions: torch.Tensor, codes: torch.Tensor, truths: list[set[int]]) -> dict[str, float]:
    top1 = top3 = 0
    for row, patient, truth in zip(attributions, codes, truths):
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
    spec = FeatureSpec({"codes": FeatureProcessor(token=True, size=len(cohort.names))}, {"label": "binary"})
    model = TransformerClassifier(spec, num_classes=2, dim=32, heads=2, layers=2).to(dev)
    start = time.perf_counter()
    loss = train(model, cohort, list(range(split)), updates, dev, seed)
    train_s = time.perf_counter() - start
    if save_model is not None:
        save_checkpoint(model, save_model, cohort={"seed": seed, "vocab": cohort.vocab})

    test = cohort.batch(range(split, patients))
    codes = test["codes"].to(dev)
    with torch.no_grad():
        prob = model(codes=codes)["y_prob"].squeeze(1).cpu()
    accuracy = ((prob > 0.5).long() == test["label"]).float().mean().item()
    print(f"cohort: {patients} patients (seed {seed}); planted codes "
          f"{', '.join(f'{cohort.names[c]} (+{e:.1f})' for c, e in cohort.truth.planted.items())}; planted pairs "
          f"{', '.join(f'{cohort.names[a]}&{cohort.names[b]} (+{e:.1f})' for (a, b), e in cohort.truth.pairs.items())}; "
          f"distractors {', '.join(cohort.names[d] for d in cohort.truth.distractors)}")
    print(f"trained {updates} updates in {train_s:.1f} s (last loss {loss:.3f}); held-out accuracy {accuracy:.3f}")

    # Patients the model calls positive and that carry acting planted truth: there the truth is
    # what the model should be using.
    truths = [present_truth(cohort, set(row.tolist())) for row in test["codes"]]
    chosen = [i for i in range(len(truths)) if truths[i] and prob[i] > 0.5][:explain]
    if not chosen:
        raise RuntimeError("no held-out patient is predicted positive with a planted code; train longer (--updates)")
    batch = {"codes": codes[chosen]}
    truth_rows = [truths[i] for i in chosen]
    ig = IntegratedGradients(model, steps=steps)
    chefer = CheferRelevance(model)
    ig_attr = ig.attribute(**batch)["codes"].detach()
    chefer_attr = chefer.attribute(**batch)["codes"].detach()
    random_attr = torch.rand(ig_attr.shape, generator=torch.Generator().manual_seed(seed)).to(dev)
    scores = {"ig": recovery(ig_attr.cpu(), batch["codes"].cpu(), truth_rows),
              "chefer": recovery(chefer_attr.cpu(), batch["codes"].cpu(), truth_rows),
              "random": recovery(random_attr.cpu(), batch["codes"].cpu(), truth_rows)}
    print(f"\nexplained {len(chosen)} held-out patients predicted positive that carry planted truth "
          f"(IG steps={steps}):")
    print("| method | planted code ranked first | planted code in top 3 | comprehensiveness (higher better) "
          "| sufficiency (lower better) |")
    print("|---|---|---|---|---|")
    for name, attr in (("ig", ig_attr), ("chefer", chefer_attr), ("random", random_attr)):
        comp, valid = comprehensiveness(model, batch, {"codes": attr})
        suff, _ = sufficiency(model, batch, {"codes": attr})
        scores[name]["comprehensiveness"] = comp[valid].mean().item()
        scores[name]["sufficiency"] = suff[valid].mean().item()
        s = scores[name]
        print(f"| {name} | {s['top1']:.0%} | {s['top3']:.0%} | {s['comprehensiveness']:.3f} | {s['sufficiency']:.3f} |")

    # The speed line runs on what users have: 32 patients of long-tailed length (log-normal,
    # median 15 codes) padded to the batch's longest, from the same generator and vocabulary.
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

    # The cohort report: every held-out patient attributed with both methods to a run folder (the
    # path to tables and summaries), then one HTML page comparing them with the truth marked.
    held_out = CohortDataset(cohort, range(split, patients))
    runs = {}
    for name, interpreter in (("ig", ig), ("chefer", chefer)):
        runs[name] = out / "runs" / name
        shutil.rmtree(runs[name], ignore_errors=True)  # the demo's own folder: never resume another model's run
        loader = torch.utils.data.DataLoader(held_out, batch_size=64, collate_fn=CohortDataset.collate)
        attribute_dataset(interpreter, loader, runs[name], vocab={"codes": cohort.names},
                          annotations=cohort.annotations(), progress=None)
    missing = missing_extras()
    report = None if missing else write_report(
        [runs["ig"], runs["chefer"]], out / "report.html", labels=["IG", "Chefer"], patients=show,
        title=f"fastattr demo: {len(held_out)} held-out patients, IG and Chefer")
    results = {"accuracy": accuracy, "patients_explained": len(chosen), "recovery": scores,
               "ig_fastattr_s": fast, "ig_loop_s": loop, "speedup": loop / fast, "device": dev.type,
               "speed_batch": {"patients": 32, "median_codes": tail_lengths.median().item(),
                               "longest": int(tail_lengths.max()), "padded_to": tail["codes"].shape[1]}}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nattributed the {len(held_out)} held-out patients with IG and Chefer: {runs['ig']}, {runs['chefer']} "
          f"(fastattr summarize / export RUN)")
    if report is None:
        print(f"wrote {out / 'results.json'}; the HTML report and the tables need {', '.join(missing)}: "
              'pip install "fastattr[report]", then fastattr report ' f"{runs['ig']} {runs['chefer']}")
    else:
        print(f"wrote {out / 'results.json'} and the report {report}")
    return results
