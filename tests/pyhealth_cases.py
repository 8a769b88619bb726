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


def _sample(kind: str, rng: random.Random, i: int, num_classes: int) -> dict:
    def codes(prefix: str, lo: int, hi: int) -> list[str]:
        return [f"{prefix}{rng.randrange(30)}" for _ in range(rng.randint(lo, hi))]

    sample = {"patient_id": f"p{i}", "visit_id": f"v{i}", "label": rng.randrange(num_classes) if num_classes > 2 else i % 2}
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
    from pyhealth.datasets import create_sample_dataset, get_dataloader
    import pyhealth.models as models
    from pyhealth.models.stagenet_mha import StageAttentionNet

    rng = random.Random(seed)
    samples = [_sample(kind, rng, i, num_classes) for i in range(n)]
    output = {"label": "binary" if num_classes == 2 else "multiclass"}
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
    loader = get_dataloader(dataset, batch_size=batch, shuffle=False)
    return model, next(iter(loader))
