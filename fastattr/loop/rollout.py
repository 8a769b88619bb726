"""PyHealth 2.1.0's attention rollout: one forward with the attention hooks on, the whole rollout matrix
``0.5 (A_L + I) ... 0.5 (A_1 + I)`` (heads averaged), reduced by the model."""
from __future__ import annotations

from typing import Any

import torch

from fastattr.loop.common import _in_input_shapes


def loop_rollout(model: torch.nn.Module, target_class_idx: Any = None, **batch: Any) -> dict[str, torch.Tensor]:
    """Rollout relevance by PyHealth 2.1.0's algorithm (``target_class_idx`` is ignored, as there)."""
    model.eval()
    model.set_attention_hooks(True)
    try:
        with torch.enable_grad():
            model(**batch)
    finally:
        model.set_attention_hooks(False)
    rollouts = {}
    for key, layers in model.get_attention_layers().items():
        rollout = None
        for attn, _ in layers:
            a = attn.detach().mean(dim=1)
            n = a.shape[-1]
            a = 0.5 * (a + torch.eye(n, dtype=a.dtype, device=a.device))
            rollout = a if rollout is None else torch.bmm(a, rollout)
        rollouts[key] = rollout
    return _in_input_shapes(model, batch, model.get_relevance_tensor(rollouts, **batch))
