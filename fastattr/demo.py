"""``fastattr demo``: train a small Transformer on a synthetic cohort and explain it with IG."""
from __future__ import annotations

import statistics
import time

import torch
from tqdm.auto import tqdm

from fastattr.ig import IntegratedGradients
from fastattr.loop import step_loop_integrated_gradients
from fastattr.models import FeatureProcessor, FeatureSpec, TransformerClassifier
from fastattr.synthetic import Cohort, make_cohort


def train(model: torch.nn.Module, cohort: Cohort, seconds: float, device: torch.device, seed: int) -> int:
    """Adam on minibatches of 64 until ``seconds`` have passed; returns the number of updates."""
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    updates, start = 0, time.perf_counter()
    with tqdm(desc="training", unit="batch", leave=False, disable=None) as bar:
        while time.perf_counter() - start < seconds:
            index = torch.randint(0, len(cohort), (64,), generator=g)
            batch = {k: v.to(device) for k, v in cohort.batch(index).items()}
            loss = model(**batch)["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            updates += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return updates


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(patients: int = 2000, seed: int = 0, steps: int = 50, batch: int = 16, train_seconds: float = 8.0,
        device: str | None = None, repeats: int = 3) -> dict:
    """Run the demo, print its report and return the measured numbers."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    cohort = make_cohort(patients=patients, seed=seed)
    split = int(0.8 * len(cohort))
    spec = FeatureSpec({"codes": FeatureProcessor(token=True, size=len(cohort.names))},
                       {"label": "binary"})
    model = TransformerClassifier(spec, num_classes=2, dim=32, heads=2, layers=2).to(dev)
    train_set = Cohort(cohort.codes[:split], cohort.labels[:split], cohort.planted, cohort.names)
    updates = train(model, train_set, train_seconds, dev, seed)
    with torch.no_grad():
        test = {k: v.to(dev) for k, v in cohort.batch(slice(split, None)).items()}
        accuracy = ((model(**test)["logit"].squeeze(1) > 0).long() == test["label"]).float().mean().item()
    print(f"cohort: {len(cohort)} patients, planted codes {sorted(cohort.names[c] for c in cohort.planted)}")
    print(f"trained {updates} updates; held-out accuracy {accuracy:.3f}")

    held = cohort.codes[split:]
    carriers = [i for i in range(held.shape[0])
                if any((held[i] == c).any() for c in cohort.planted)][:batch]
    explain = {"codes": held[carriers].to(dev)}
    ig = IntegratedGradients(model, steps=steps)
    attributions = ig.attribute(**explain)["codes"].cpu()
    hits = 0
    print(f"\nIG (steps={steps}) on {len(carriers)} held-out patients carrying a planted code:")
    for row, codes in zip(attributions, explain["codes"].cpu()):
        scores = row.masked_fill(codes == 0, float("-inf"))
        order = scores.argsort(descending=True)
        seen, top = set(), []
        for pos in order.tolist():
            code = int(codes[pos])
            if code and code not in seen:
                seen.add(code)
                top.append(code)
            if len(top) == 3:
                break
        hits += top[0] in cohort.planted
        marked = ", ".join(f"{cohort.names[c]}{'*' if c in cohort.planted else ''}" for c in top)
        planted_here = sorted(cohort.names[c] for c in set(codes.tolist()) & set(cohort.planted))
        print(f"  top: {marked:<30} planted present: {', '.join(planted_here)}")
    recovery = hits / max(len(carriers), 1)
    print(f"planted code ranked first: {hits}/{len(carriers)} ({recovery:.0%})  (* = planted)")

    fast = median_time(lambda: ig.attribute(**explain), repeats)
    loop = median_time(lambda: step_loop_integrated_gradients(model, steps=steps, **explain), repeats)
    print(f"\nspeed on {dev.type} ({len(carriers)} patients, {steps} steps, median of {repeats}): "
          f"fastattr {fast * 1e3:.1f} ms, one-step-at-a-time loop {loop * 1e3:.1f} ms, "
          f"{loop / fast:.2f}x faster")
    return {"accuracy": accuracy, "recovery_top1": recovery, "fastattr_s": fast, "loop_s": loop}
