"""Whether a model's ``get_relevance_tensor`` only picks one row of R per sample.

Chefer's relevance R is ``(I + C_L) ... (I + C_1)``; when the model's reduction returns entries of
one row of R per sample (PyHealth's Transformer: the CLS row; StageAttentionNet: the last valid
timestep's), that row can be pushed from the last layer to the first in O(L N^2) instead of forming
R in O(L N^3), with the identical result. Found by calling the reduction on probe tensors: an
index-coded probe names the candidate rows and columns, and random probes (per entry, per sample
row, of both signs) confirm that the reduction only selects, never sums, averages, scales or
rectifies. :class:`RowPicks` caches the verdict per model layout, so later batches need only the
index-coded probe.
"""
from __future__ import annotations

from typing import Any

import torch


def _selection_probes(tokens: int, batch: int, generator: torch.Generator,
                      device: torch.device) -> list[torch.Tensor]:
    """Random [B, N, N] probes of both signs, per entry and per row, that cost at most N*N memory
    (stride-0 expands): a reduction that sums, averages, scales or rectifies rows cannot
    reproduce them exactly, only a selection can."""
    per_entry = torch.randn(tokens, tokens, generator=generator).to(device).expand(batch, tokens, tokens)
    per_row = torch.randn(batch, tokens, 1, generator=generator).to(device).expand(batch, tokens, tokens)
    return [per_entry, per_row]


def _index_probe(tokens: int, batch: int, device: torch.device) -> torch.Tensor:
    """R[b, i, j] = i * N + j, exact in the probe's dtype (float64 past N = 4096)."""
    dtype = torch.float32 if tokens <= 4096 else torch.float64
    idx = torch.arange(tokens, dtype=dtype, device=device)
    return (idx[:, None] * tokens + idx[None, :]).expand(batch, tokens, tokens)


def _relevance_of(model: Any, probes: dict[str, torch.Tensor], data: dict[str, Any]) -> dict[str, Any] | None:
    try:
        out = model.get_relevance_tensor(probes, **data)
    except Exception:  # a reduction that cannot take the probes (in-place writes...) is no row pick
        return None
    return out if isinstance(out, dict) and set(out) == set(probes) else None


def detect_row_picks(model: Any, tokens: dict[str, int], batch: int, data: dict[str, Any],
                     device: torch.device, *, known: bool = False
                     ) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """Whether ``model.get_relevance_tensor`` returns, per key and sample, entries of one row of R.

    Returns ``{key: (rows [B], cols [B, M])}`` such that the reduction equals
    ``R[b, rows[b], cols[b, m]]``, or ``None`` when any key's reduction is something else. One
    call with an index-coded probe finds the candidate rows and columns; unless ``known`` (an
    earlier batch of this model and layout passed), two calls with random probes confirm that the
    reduction only selects.
    """
    coded = _relevance_of(model, {k: _index_probe(n, batch, device) for k, n in tokens.items()}, data)
    if coded is None:
        return None
    picks = {}
    for key, n in tokens.items():
        out = coded[key]
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != batch or out.shape[1] == 0:
            return None
        out = out.double()
        if not torch.equal(out, out.round()) or bool(((out < 0) | (out >= n * n)).any()):
            return None
        rows, cols = (out // n).long(), (out % n).long()
        if not bool((rows == rows[:, :1]).all()):
            return None
        picks[key] = (rows[:, 0], cols)
    if known:
        return picks
    generator = torch.Generator().manual_seed(0)
    probes = {k: _selection_probes(n, batch, generator, device) for k, n in tokens.items()}
    for i in range(2):
        out = _relevance_of(model, {k: p[i] for k, p in probes.items()}, data)
        if out is None:
            return None
        for key, (rows, cols) in picks.items():
            expected = probes[key][i][torch.arange(batch, device=device)[:, None], rows[:, None], cols]
            got = out[key]
            if not isinstance(got, torch.Tensor) or got.shape != expected.shape or \
                    not torch.equal(got.to(expected.dtype), expected):
                return None
    return picks



class RowPicks:
    """:func:`detect_row_picks` with its verdict cached per layout: unknown, a row pick (later
    batches run only the index-coded probe), or not one (never probed again)."""

    def __init__(self) -> None:
        self.verdicts: dict[tuple, bool] = {}

    def find(self, model: Any, key: tuple, tokens: dict[str, int], batch: int, data: dict[str, Any],
             device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        """The picked ``{key: (rows [B], cols [B, M])}``, or ``None`` when the reduction is not a row pick."""
        if not self.verdicts.get(key, True):
            return None
        picks = detect_row_picks(model, tokens, batch, data, device, known=key in self.verdicts)
        self.verdicts[key] = picks is not None
        return picks
