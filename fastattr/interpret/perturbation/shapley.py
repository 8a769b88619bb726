"""Exact Shapley values by enumeration, an opt-in beyond PyHealth's sampled Kernel SHAP.

The players are a patient's own positions (every position of every key that holds data); padding is
not a player and stays as the input gives it. A patient with ``n`` players whose ``2**n`` coalitions fit
the coalition budget runs all of them, one row each (fewer forwards than sampling 1,000, and no
sampling error), and gets

    phi_i = sum over coalitions S without i of |S|! (n - |S| - 1)! / n! * (v(S + i) - v(S)),

``v`` the target's logit with the players outside ``S`` at the baseline. Its values sum to
``v(all) - v(none)`` and are 0 on padding.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fastattr.interpret.perturbation.engine import GatedRows


@dataclass
class Enumeration:
    """Every coalition of the eligible patients: ``rows`` (one per coalition, players' bits in order),
    per patient its players ``(key, position)`` and its rows' span ``[start, stop)``."""

    rows: GatedRows
    players: dict[int, list[tuple[str, int]]]
    spans: dict[int, tuple[int, int]]


def players_of(present: Mapping[str, torch.Tensor], sample: int) -> list[tuple[str, int]]:
    """Patient ``sample``'s players: its positions that hold data, keys sorted, positions in order."""
    return [(key, int(j)) for key in sorted(present) for j in present[key][sample].nonzero().flatten().tolist()]


def enumerate_coalitions(present: Mapping[str, torch.Tensor], budget: int) -> Enumeration:
    """The rows of every coalition of every patient with ``2**n <= budget`` players (bit ``i`` of row
    ``r - start`` keeps player ``i``); the others are left out. Padding positions keep the input."""
    counts = {k: p.shape[1] for k, p in present.items()}
    device = next(iter(present.values())).device
    samples, gates, players, spans = [], {k: [] for k in counts}, {}, {}
    start = 0
    for sample in range(next(iter(present.values())).shape[0]):
        mine = players_of(present, sample)
        if 2 ** len(mine) > budget:
            continue
        total = 2 ** len(mine)
        bits = (torch.arange(total, device=device)[:, None] >> torch.arange(len(mine), device=device)) & 1
        per_key = {k: torch.ones(total, n, device=device) for k, n in counts.items()}
        for i, (key, position) in enumerate(mine):
            per_key[key][:, position] = bits[:, i].float()
        for key in counts:
            gates[key].append(per_key[key])
        samples.append(torch.full((total,), sample, dtype=torch.long, device=device))
        players[sample], spans[sample] = mine, (start, start + total)
        start += total
    if not samples:
        return Enumeration(GatedRows(torch.zeros(0, dtype=torch.long), {}, torch.zeros(1, 0, dtype=torch.long)),
                           {}, {})
    full = torch.tensor([[stop - 1 for _, stop in spans.values()]], device=device)  # each patient's full coalition
    rows = GatedRows(torch.cat(samples), {k: torch.cat(v) for k, v in gates.items()}, full)
    return Enumeration(rows, players, spans)


def shapley_weights(players: int) -> torch.Tensor:
    """``[2**n, n]`` float64: row ``S`` (bits), column ``i``: the weight of ``v(S)`` in ``phi_i``,
    ``|S - i|! (n - |S - i| - 1)! / n!`` with a plus sign where ``i`` is in ``S``, a minus sign where not."""
    total = 2 ** players
    bits = (torch.arange(total)[:, None] >> torch.arange(players)) & 1
    size = bits.sum(1, keepdim=True)
    weight = [math.factorial(k) * math.factorial(players - k - 1) / math.factorial(players) if k < players else 0.0
              for k in range(players + 1)]
    table = torch.tensor(weight, dtype=torch.float64)
    return torch.where(bits == 1, table[(size - 1).clamp(min=0)], -table[size])


def exact_values(enumeration: Enumeration, logits: torch.Tensor,
                 counts: Mapping[str, int]) -> dict[int, dict[str, torch.Tensor]]:
    """Per eligible patient, per key ``[n_key]`` (float32): the exact Shapley values from the logits of
    its rows (``logits [R]``, in the enumeration's order); 0 on positions that are not players."""
    out = {}
    for sample, (start, stop) in enumeration.spans.items():
        mine = enumeration.players[sample]
        values = {k: torch.zeros(n, dtype=torch.float64, device=logits.device) for k, n in counts.items()}
        if mine:
            phi = shapley_weights(len(mine)).to(logits.device).transpose(0, 1) @ logits[start:stop].double()
            for (key, position), value in zip(mine, phi, strict=True):
                values[key][position] = value
        out[sample] = {k: v.float() for k, v in values.items()}
    return out
