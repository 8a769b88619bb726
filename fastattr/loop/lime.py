"""PyHealth 2.1.0's LIME, one perturbation at a time on the padded batch, one fit per patient."""
from __future__ import annotations

from typing import Any

import torch

from fastattr.loop.common import _gating_setup, _schema


def _lime_draws(order: list[str], counts: dict[str, int], n_samples: int, random_seed: int | None,
                device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Per perturbation, per key in the batch's order, ``torch.bernoulli(0.5 * ones(n))`` from the
    global generator, seeded for the call (its state restored) unless ``random_seed`` is ``None``."""
    state = torch.get_rng_state()
    if random_seed is not None:
        torch.manual_seed(random_seed)
    draws = [{k: torch.bernoulli(torch.full((counts[k],), 0.5, device=device)) for k in order}
             for _ in range(n_samples)]
    if random_seed is not None:
        torch.set_rng_state(state)
    return draws


def _lime_weight(x: torch.Tensor, p: torch.Tensor, distance_mode: str, kernel_width: float) -> torch.Tensor:
    """``exp(-d^2 / (2 w^2))`` for two flat float vectors, ``d`` = 1 - cosine or the Euclidean distance."""
    if distance_mode == "cosine":
        d = 1 - (x @ p) / torch.clamp(x.norm() * p.norm(), min=1e-8)
    else:
        d = (x - p).pow(2).sum().sqrt()
    return torch.exp(-d * d / (2 * kernel_width * kernel_width))


def _lime_fit(samples: torch.Tensor, y: torch.Tensor, w: torch.Tensor, feature_selection: str,
              alpha: float) -> torch.Tensor:
    """One patient's weighted least squares, PyHealth's construction: ``alpha * I`` rows (lasso),
    ``sqrt(alpha) * I`` (ridge) or none appended to ``sqrt(w)``-scaled rows."""
    total = samples.shape[1]
    a, b = w.sqrt()[:, None] * samples, w.sqrt() * y
    if feature_selection != "none":
        scale = alpha if feature_selection == "lasso" else torch.sqrt(torch.tensor(alpha)).item()
        a = torch.cat([a, scale * torch.eye(total)])
        b = torch.cat([b, torch.zeros(total)])
    return torch.linalg.lstsq(a, b).solution


def loop_lime(model: Any, batch: dict, *, use_embeddings: bool = True, n_samples: int = 1000,
              kernel_width: float = 0.25, distance_mode: str = "cosine", feature_selection: str = "lasso",
              alpha: float = 0.01, random_seed: int | None = 42, baseline: dict | None = None,
              target_class_idx: Any = None) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """PyHealth 2.1.0's LIME, one forward of the whole padded batch per perturbation, over each key's
    ``shape[1]`` positions (drawn in the batch's key order, fitted in sorted order):
    ``(attributions, logits [N, B], weights [N, B])``."""
    s = _gating_setup(model, batch, baseline, target_class_idx, use_embeddings)
    device, inputs, values, targets, token, embed, xs, bs = (s.device, s.inputs, s.values, s.targets, s.token,
                                                             s.embed, s.xs, s.bs)
    keys = sorted(values)
    counts = {k: values[k].shape[1] if values[k].dim() >= 2 else values[k].shape[-1] for k in keys}
    size = next(iter(values.values())).shape[0]
    draws = _lime_draws([k for k in batch if k in values], counts, n_samples, random_seed, device)
    preds, weights = [], []
    with torch.no_grad():
        for gates in draws:
            call, mixed = dict(inputs), {}
            for key in keys:
                g = gates[key].expand(size, -1)
                while g.dim() < xs[key].dim():
                    g = g.unsqueeze(-1)
                mixed[key] = torch.where(g == 1, xs[key], bs[key])
                fed = embed({key: mixed[key]})[key] if embed is not None and not token[key] else mixed[key]
                slot = _schema(model, key).index("value")
                call[key] = (*inputs[key][:slot], fed, *inputs[key][slot + 1:])
            out = model.forward_from_embedding(**call) if embed is not None else model.forward(**call)
            column = out["logit"] if out["logit"].dim() > 1 else out["logit"][:, None]
            preds.append(column.gather(1, targets[:, None])[:, 0])
            weights.append(torch.stack([
                _lime_weight(torch.cat([xs[k][b].reshape(-1).float() for k in keys]),
                             torch.cat([mixed[k][b].reshape(-1).float() for k in keys]), distance_mode, kernel_width)
                for b in range(size)]))
    samples = torch.stack([torch.cat([g[k] for k in keys]) for g in draws]).float().cpu()
    y, w = torch.stack(preds).cpu(), torch.stack(weights).cpu()
    fits = torch.stack([_lime_fit(samples, y[:, b], w[:, b], feature_selection, alpha) for b in range(size)])
    out = {}
    for key, part in zip(keys, fits.split([counts[k] for k in keys], dim=1), strict=True):
        shape = values[key].shape
        while part.dim() < len(shape):
            part = part.unsqueeze(-1)
        out[key] = (part.expand(shape) if part.shape != shape else part).to(device)
    return out, y, w
