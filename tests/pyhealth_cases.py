"""Builders of real PyHealth 2.1.0 datasets, models and batches for the parity tests."""
from __future__ import annotations

import random

import torch

SCHEMAS = {
    "seq": {"conditions": "sequence", "procedures": "sequence"},
    "nested": {"visits": "nested_sequence", "procedures": "sequence"},
    "mlp": {"conditions": "sequence", "labs": "tensor"},
    "seq_tensor": {"conditions": "sequence", "labs": "tensor"},
    "tensor_only": {"labs": "tensor"},
    "stagenet": {"codes": "stagenet", "vitals": "stagenet_tensor"},
}


def _label(rng: random.Random, i: int, num_classes: int, mode: str):
    if mode == "multilabel":
        return [f"l{c}" for c in rng.sample(range(num_classes), rng.randint(1, num_classes))]
    return rng.randrange(num_classes) if mode == "multiclass" else i % 2


def _sample(kind: str, rng: random.Random, i: int, num_classes: int, mode: str) -> dict:
    def codes(prefix: str, lo: int, hi: int) -> list[str]:
        return [f"{prefix}{rng.randrange(30)}" for _ in range(rng.randint(lo, hi))]

    sample = {"patient_id": f"p{i}", "visit_id": f"v{i}", "label": _label(rng, i, num_classes, mode)}
    if kind == "seq":
        sample.update(conditions=codes("c", 2, 9), procedures=codes("p", 1, 5))
    elif kind == "nested":
        sample.update(visits=[codes("d", 1, 4) for _ in range(rng.randint(1, 4))], procedures=codes("p", 1, 6))
    elif kind in ("mlp", "tensor_only", "seq_tensor"):
        sample["labs"] = [rng.uniform(-2, 2) for _ in range(6 if kind == "seq_tensor" else 5)]
        if kind != "tensor_only":
            sample["conditions"] = codes("c", 2, 8)
    elif kind == "stagenet":
        n = rng.randint(2, 6)
        times = sorted(rng.uniform(0, 10) for _ in range(n))
        sample["codes"] = (times, [codes("s", 1, 3) for _ in range(n)])
        m = rng.randint(2, 5)
        sample["vitals"] = ([float(t) for t in range(m)], [[rng.uniform(-1, 1) for _ in range(4)] for _ in range(m)])
    return sample


def build(kind: str, model_name: str, num_classes: int = 2, n: int = 12, batch: int = 5, seed: int = 0, **model_kwargs):
    """Return (model, batch) for a PyHealth model on a small random dataset of ``kind``."""
    model, loader = build_loader(kind, model_name, num_classes, n, batch, seed, **model_kwargs)
    return model, next(iter(loader))


def build_loader(kind: str, model_name: str, num_classes: int = 2, n: int = 12, batch: int = 5, seed: int = 0,
                 mode: str | None = None, **model_kwargs):
    """Return (model, PyHealth dataloader) on a small random dataset of ``kind``; ``mode``: the label
    kind (default binary for 2 classes, else multiclass; or "multilabel")."""
    import pyhealth.models as models
    from pyhealth.datasets import create_sample_dataset, get_dataloader
    from pyhealth.models.stagenet_mha import StageAttentionNet

    rng = random.Random(seed)
    mode = mode or ("binary" if num_classes == 2 else "multiclass")
    samples = [_sample(kind, rng, i, num_classes, mode) for i in range(n)]
    output = {"label": mode}
    dataset = create_sample_dataset(samples=samples, input_schema=SCHEMAS[kind], output_schema=output,
                                    dataset_name=f"{kind}-{seed}")
    torch.manual_seed(seed)
    cls = StageAttentionNet if model_name == "StageAttentionNet" else getattr(models, model_name)
    model = cls(dataset=dataset, **model_kwargs)
    # Random, untrained weights give small logits; scale so attributions are not near zero.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    model.eval()
    return model, get_dataloader(dataset, batch_size=batch, shuffle=False)
