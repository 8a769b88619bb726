"""PyHealth 2.1.0's RandomBaseline: one ``rand_like`` / ``randn_like`` per feature value, in the batch's
key order, torch seeded for the call and every global random state put back after."""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from fastattr.loop.common import _device, _schema


def loop_random_baseline(model: torch.nn.Module, random_seed: int | None = None, distribution: str = "uniform",
                         **batch: Any) -> dict[str, torch.Tensor]:
    """Random attributions as PyHealth 2.1.0 draws them."""
    values = {}
    for key, feature in batch.items():
        if key in model.feature_keys:
            parts = (feature,) if isinstance(feature, torch.Tensor) else tuple(feature)
            values[key] = parts[_schema(model, key).index("value")]
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
             torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None)
    if random_seed is not None:
        torch.manual_seed(random_seed)
    out = {}
    for key, value in values.items():
        if distribution == "uniform":
            out[key] = torch.rand_like(value.float())
        elif distribution == "normal":
            out[key] = torch.randn_like(value.float())
        else:
            out[key] = torch.rand_like(value.float()) * 2 - 1
        out[key] = out[key].to(_device(model))
    if random_seed is not None:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])
        if saved[3] is not None:
            torch.cuda.set_rng_state_all(saved[3])
    return out
