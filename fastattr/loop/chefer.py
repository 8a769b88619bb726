"""PyHealth 2.1.0's Chefer relevance: a full backward, then the full relevance matrix R per layer."""
from __future__ import annotations

from typing import Any

import torch

from fastattr.loop.common import _in_input_shapes, _targets


def full_relevance(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """PyHealth 2.1.0's propagation as its chefer.py writes it: R = I, then R = R + cam @ R per
    layer with cam = mean over heads of clamp(attn * grad, 0); returns the full ``[B, N, N]``."""
    attn0 = layers[0][0]
    R = torch.eye(attn0.shape[-1], device=attn0.device).unsqueeze(0).repeat(attn0.shape[0], 1, 1)
    for attn, grad in layers:
        cam = (grad * attn).clamp(min=0)
        if cam.dim() == 4:
            cam = cam.mean(dim=1)
        R = R + torch.matmul(cam, R).detach()
    return R


def full_chefer_relevance(model: torch.nn.Module, target_class_idx: Any = None,
                          **batch: Any) -> dict[str, torch.Tensor]:
    """Chefer relevance by PyHealth 2.1.0's algorithm: a full backward, then the full R per layer,
    reduced by the model and expanded to nested inputs' shapes."""
    model.eval()
    model.set_attention_hooks(True)
    try:
        logits = model(**batch)["logit"]
    finally:
        model.set_attention_hooks(False)
    targets = _targets(target_class_idx, logits.detach())
    model.zero_grad()
    (torch.nn.functional.one_hot(targets, logits.shape[1]).float() * logits).sum().backward()
    model.zero_grad(set_to_none=True)
    R = {key: full_relevance(layers) for key, layers in model.get_attention_layers().items()}
    return _in_input_shapes(model, batch, model.get_relevance_tensor(R, **batch))
