"""PyHealth 2.1.0's Kernel SHAP, one coalition at a time on the padded batch."""
from __future__ import annotations

from typing import Any

import torch

from fastattr.loop.common import _gating_setup, _schema


def _shap_coalitions(total: int, count: int, random_seed: int | None, device: torch.device) -> list[torch.Tensor]:
    """Empty, full, then ``torch.randint(2, (M,))`` one per coalition from the global generator,
    seeded for the call (its state restored) unless ``random_seed`` is ``None``."""
    state = torch.get_rng_state()
    if random_seed is not None:
        torch.manual_seed(random_seed)
    coalitions = [torch.zeros(total, device=device), torch.ones(total, device=device)]
    for _ in range(max(0, count - 2)):
        coalitions.append(torch.randint(2, (total,), device=device).float())
    if random_seed is not None:
        torch.set_rng_state(state)
    return coalitions


def _shap_fit(coalitions: list[torch.Tensor], preds: list[torch.Tensor], regularization: float) -> torch.Tensor:
    """PyHealth's weighted ridge least squares, float32, built and solved as PyHealth does (its float32
    solution depends on the construction: the system is ill-conditioned)."""
    import math

    x = torch.stack(coalitions)
    total = x.shape[1]
    weights = [torch.tensor(1000.0 if z in (0, total) else (total - 1) / (math.comb(total, z) * z * (total - z)),
                            dtype=torch.float32) for z in x.sum(1).long().tolist()]
    root = torch.stack(weights).to(x.device).sqrt()[:, None]
    ridge = torch.sqrt(torch.tensor(regularization, device=x.device)) * torch.eye(total, device=x.device)
    y = torch.stack(preds)
    a = torch.cat([root * x, ridge])
    b = torch.cat([root * y, torch.zeros((total, y.shape[1]), device=x.device)])
    return torch.linalg.lstsq(a, b).solution.T


def loop_kernel_shap(model: Any, batch: dict, *, use_embeddings: bool = True, max_coalitions: int = 1000,
                     regularization: float = 1e-6, random_seed: int | None = 42, baseline: dict | None = None,
                     target_class_idx: Any = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """PyHealth 2.1.0's Kernel SHAP, one forward of the whole padded batch per coalition, over the
    batch's ``M`` positions (each key's ``shape[1]``, keys sorted): ``(attributions, logits [N, B])``."""
    s = _gating_setup(model, batch, baseline, target_class_idx, use_embeddings)
    device, inputs, values, targets, token, embed, xs, bs = (s.device, s.inputs, s.values, s.targets, s.token,
                                                             s.embed, s.xs, s.bs)
    keys = sorted(values)
    counts = [values[k].shape[1] if values[k].dim() >= 2 else values[k].shape[-1] for k in keys]
    size = next(iter(values.values())).shape[0]
    coalitions = _shap_coalitions(sum(counts), min(2 ** sum(counts), max_coalitions), random_seed, device)
    preds = []
    with torch.no_grad():
        for coalition in coalitions:
            call = dict(inputs)
            for key, gate in zip(keys, coalition.split(counts), strict=True):
                g = gate.expand(size, -1)
                while g.dim() < xs[key].dim():
                    g = g.unsqueeze(-1)
                mixed = torch.where(g == 1, xs[key], bs[key])
                if embed is not None and not token[key]:
                    mixed = embed({key: mixed})[key]
                slot = _schema(model, key).index("value")
                call[key] = (*inputs[key][:slot], mixed, *inputs[key][slot + 1:])
            out = model.forward_from_embedding(**call) if embed is not None else model.forward(**call)
            column = out["logit"] if out["logit"].dim() > 1 else out["logit"][:, None]
            preds.append(column.gather(1, targets[:, None])[:, 0])
    out = {}
    for key, part in zip(keys, _shap_fit(coalitions, preds, regularization).split(counts, dim=1), strict=True):
        shape = values[key].shape
        while part.dim() < len(shape):
            part = part.unsqueeze(-1)
        out[key] = part.expand(shape) if part.shape != shape else part
    return out, torch.stack(preds)


def brute_force_shapley(model: Any, batch: dict, *, use_embeddings: bool = True, baseline: dict | None = None,
                        target_class_idx: Any = None) -> dict[str, torch.Tensor]:
    """Exact Shapley values by their definition, one patient at a time: the players are the patient's
    positions that hold data (its mask), ``v(S)`` the target's logit of the patient alone (its padded
    row) with the players outside ``S`` at the baseline, and ``phi_i`` the mean over every ordering of
    the players of ``v(before i, and i) - v(before i)``. Padding positions are 0. For a handful of
    players only (``n!`` orderings)."""
    import itertools

    s = _gating_setup(model, batch, baseline, target_class_idx, use_embeddings)
    device, inputs, values, targets, token, baseline, embed = (s.device, s.inputs, s.values, s.targets, s.token,
                                                               s.baseline, s.embed)
    keys = sorted(values)
    out = {k: torch.zeros(values[k].shape[:2]) for k in keys}
    for b in range(next(iter(values.values())).shape[0]):
        players = []
        for key in keys:
            schema = _schema(model, key)
            mask = inputs[key][schema.index("mask")] if "mask" in schema else inputs[key][-1]
            players += [(key, j) for j in range(values[key].shape[1]) if bool(mask[b, j].ne(0).any())]
        cache: dict[frozenset, float] = {}

        def v(kept: frozenset, b: int = b, players: list = players, cache: dict = cache) -> float:
            if kept not in cache:
                call = {k: tuple(t[b:b + 1] if isinstance(t, torch.Tensor) else t for t in inputs[k]) for k in keys}
                for key in keys:
                    x = values[key][b:b + 1]
                    base = baseline[key].to(device).expand_as(values[key])[b:b + 1]
                    gone = [j for (k, j) in players if k == key and (k, j) not in kept]
                    if embed is not None and token[key]:
                        x, base = embed({key: x})[key], embed({key: base})[key]
                    mixed = x.clone()
                    mixed[:, gone] = base[:, gone]
                    if embed is not None and not token[key]:
                        mixed = embed({key: mixed})[key]
                    slot = _schema(model, key).index("value")
                    call[key] = (*call[key][:slot], mixed, *call[key][slot + 1:])
                with torch.no_grad():
                    res = model.forward_from_embedding(**call) if embed is not None else model.forward(**call)
                column = res["logit"] if res["logit"].dim() > 1 else res["logit"][:, None]
                cache[kept] = float(column[0, targets[b]])
            return cache[kept]

        orders = list(itertools.permutations(players))
        for player in players:
            total = 0.0
            for order in orders:
                before = frozenset(order[:order.index(player)])
                total += v(before | {player}) - v(before)
            out[player[0]][b, player[1]] = total / len(orders)
    return out
