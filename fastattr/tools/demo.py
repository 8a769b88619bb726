"""``fastattr demo``: train a small Transformer on a synthetic cohort with planted truth, explain
held-out patients with IG and Chefer, and score the explanations against that truth."""
from __future__ import annotations

import html
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fastattr.tools.bench import time_interleaved
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


def _color(value: float, scale: float) -> str:
    x = max(-1.0, min(1.0, value / scale)) if scale > 0 else 0.0
    if x >= 0:
        return f"rgba(214, 39, 40, {x:.2f})"
    return f"rgba(31, 119, 180, {-x:.2f})"


def write_html(path: Path, cohort: SyntheticCohort, rows: list[dict]) -> None:
    parts = ["<!doctype html><meta charset='utf-8'><title>fastattr demo</title>",
             "<style>body{font-family:sans-serif} span{padding:2px 4px;margin:1px;display:inline-block;"
             "border-radius:3px;font-family:monospace} .planted{outline:2px solid #222}</style>",
             "<h1>fastattr demo: per-code attributions</h1>",
             "<p>Red: pushes towards the positive label; blue: away. Outlined: a planted code acting in "
             "this patient.</p>"]
    for row in rows:
        parts.append(f"<h3>patient {row['patient']} (p(positive) = {row['prob']:.2f})</h3>")
        for method in ("ig", "chefer"):
            scores = row[method]
            scale = max((abs(s) for s in scores), default=1.0)
            spans = "".join(
                f"<span class='{'planted' if c in row['truth'] else ''}' style='background:{_color(s, scale)}' "
                f"title='{s:.4f}'>{html.escape(cohort.names[c])}</span>"
                for c, s in zip(row["codes"], scores))
            parts.append(f"<p><b>{'IG' if method == 'ig' else 'Chefer'}</b> {spans}</p>")
    path.write_text("\n".join(parts), encoding="utf-8")


def write_png(path: Path, cohort: SyntheticCohort, rows: list[dict]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(2 * len(rows), 1, figsize=(12, 1.1 * 2 * len(rows) + 0.6), squeeze=False)
    for i, row in enumerate(rows):
        for j, method in enumerate(("ig", "chefer")):
            ax = axes[2 * i + j, 0]
            scores = torch.tensor(row[method])
            scale = scores.abs().max().clamp_min(1e-12).item()
            ax.imshow(scores[None, :].numpy(), cmap="coolwarm", vmin=-scale, vmax=scale, aspect="auto")
            ax.set_yticks([0], [f"#{row['patient']} {'IG' if method == 'ig' else 'Chefer'}"])
            ax.set_xticks(range(len(row["codes"])), [cohort.names[c] for c in row["codes"]], rotation=90, fontsize=7)
            for tick, code in zip(ax.get_xticklabels(), row["codes"]):
                if code in row["truth"]:
                    tick.set_color("darkred")
                    tick.set_fontweight("bold")
    fig.suptitle("fastattr demo: attribution per code (red = towards positive); planted codes in bold red")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(patients: int = 2000, seed: int = 0, steps: int = 50, updates: int = 600, explain: int = 32,
        device: str | None = None, out: str | Path = "fastattr-demo", repeats: int = 3, show: int = 4,
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

    rows = []
    for r in range(min(show, len(chosen))):
        keep = batch["codes"][r] != 0
        rows.append({"patient": split + chosen[r], "prob": prob[chosen[r]].item(),
                     "codes": batch["codes"][r][keep].tolist(), "truth": truth_rows[r],
                     "ig": ig_attr[r][keep].tolist(), "chefer": chefer_attr[r][keep].tolist()})
    write_html(out / "attributions.html", cohort, rows)
    png = write_png(out / "attributions.png", cohort, rows)
    results = {"accuracy": accuracy, "patients_explained": len(chosen), "recovery": scores,
               "ig_fastattr_s": fast, "ig_loop_s": loop, "speedup": loop / fast, "device": dev.type,
               "speed_batch": {"patients": 32, "median_codes": tail_lengths.median().item(),
                               "longest": int(tail_lengths.max()), "padded_to": tail["codes"].shape[1]}}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out / 'attributions.html'}" + (f", {out / 'attributions.png'}" if png else
          " (install matplotlib for the PNG)") + f" and {out / 'results.json'}")
    return results
