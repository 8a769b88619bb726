"""The perturbation engine: a model's logits for many gated copies of a batch's samples.

A row is one sample with a gate over its feature positions (1: the input's value, 0: the
baseline's), as SHAP's coalitions and LIME's perturbations define them. PyHealth runs one forward
of the whole padded batch per draw; here every draw's rows are built at once, a sample's identical
rows run once, and the distinct rows run no-grad through the length groups
(:meth:`fastattr.interpret.lengths.LengthGroups.execute`), trimmed where that is exact.

Two checks guard the two savings, both on the batch at hand. A gate on a padding position changes
what the model sees (the baseline's embedding, PyHealth's UNK, lands there); a model that masks
padding by the mask it is given ignores it, one that infers its mask from the embeddings does not.
So before rows that differ only at padding are merged, a few of the batch's own draws run padded
with their padding gated as drawn and left as input, and must give the same logits (within
:data:`fastattr.interpret.padding.PADDING_RTOL`); where they do not, every row keeps its padding's
gates and runs at the batch's width. Trimming is checked as the evaluator checks it: the batch's
samples trimmed against their forward as given.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fastattr.interpret.features import FeatureBatch
from fastattr.interpret.lengths import LengthGroups, layout_key
from fastattr.interpret.outputs import logits_of
from fastattr.interpret.padding import PADDING_RTOL, relative_difference
from fastattr.interpret.perturbation.rows import distinct_per_sample, run_rows, trimming_allowed

# Draws of a batch that the padding-gate check runs (the empty coalition first where drawn).
CHECK_DRAWS = 3


@dataclass
class GatedRows:
    """Distinct rows: ``samples [R]`` (whose row), ``gates`` per key ``[R, n_key]`` (float, 1 keeps
    the input), and ``inverse [N, B]``: the row of draw ``n`` for sample ``b``."""

    samples: torch.Tensor
    gates: dict[str, torch.Tensor]
    inverse: torch.Tensor


def feature_counts(features: FeatureBatch) -> dict[str, int]:
    """PyHealth's feature count per key: a value's ``shape[1]`` (its last dim when 1-D)."""
    return {k: (v.shape[1] if v.dim() >= 2 else v.shape[-1]) for k, v in features.values().items()}


def present_positions(features: FeatureBatch) -> dict[str, torch.Tensor]:
    """Per key ``[B, n_key]`` bool: the positions that hold data (any of their mask set), along the
    first dim after the batch; every position of a feature without padded dims."""
    out = {}
    for key, span in zip(features.keys, features.padded_spans(), strict=True):
        value = features.value(key)
        n = value.shape[1] if value.dim() >= 2 else value.shape[-1]
        if span == 0:
            out[key] = torch.ones(features.size, n, dtype=torch.bool, device=value.device)
        else:
            out[key] = features.mask(key).ne(0).reshape(features.size, n, -1).any(-1)
    return out


def gated_rows(draws: Mapping[str, torch.Tensor], present: Mapping[str, torch.Tensor] | None,
               size: int) -> GatedRows:
    """The distinct rows of ``draws`` (per key ``[N, n_key]``, shared by the ``size`` samples): with
    ``present`` (per key ``[B, n_key]``), a gate on a position without data is set to 1, so rows
    that differ only there are one row; without it every gate counts."""
    keys = list(draws)
    per_sample = {}
    for key in keys:
        gate = draws[key].unsqueeze(1).expand(-1, size, -1)
        if present is not None:
            gate = torch.where(present[key].unsqueeze(0), gate, torch.ones_like(gate))
        per_sample[key] = gate
    draw, sample, inverse = distinct_per_sample([per_sample[k] for k in keys])
    gates = {k: per_sample[k][draw, sample].float() for k in keys}
    return GatedRows(sample, gates, inverse.view(-1, size))


class PerturbationRunner:
    """The logits of a target class for gated rows of a batch (see the module docstring).

    Args:
        model: the model (PyHealth protocol).
        lengths: the caller's length groups (its padding verdicts and group plans).
        use_embeddings: gate in embedding space (token keys' input and baseline embedded, continuous
            keys gated raw, then embedded; ``forward_from_embedding``), else in the raw values (``forward``).
    """

    def __init__(self, model: Any, lengths: LengthGroups, *, use_embeddings: bool) -> None:
        self.model, self.lengths, self.use_embeddings = model, lengths, use_embeddings
        self.merged_padding = False  # whether the last call merged rows that differ only at padding
        self.last_rows = 0  # distinct rows the last call ran

    def run(self, features: FeatureBatch, baselines: Mapping[str, torch.Tensor], draws: Mapping[str, torch.Tensor],
            targets: torch.Tensor, *, pack: bool | str, reference: torch.Tensor | None = None) -> torch.Tensor:
        """``[N, B]`` logits of ``targets [B]`` for every draw (per key ``[N, n_key]``) on every sample,
        ``baselines`` per key (broadcasting to the raw value); ``reference``: the batch's logits as given."""
        present = present_positions(features)
        padded = not all(bool(p.all()) for p in present.values())
        self.merged_padding = not padded or not self.padding_gates_matter(features, baselines, draws, present, targets)
        rows = gated_rows(draws, present if self.merged_padding else None, features.size)
        logits = self.run_rows(features, baselines, rows, targets, pack=pack if self.merged_padding else False,
                               reference=reference)
        return logits[rows.inverse]

    def run_rows(self, features: FeatureBatch, baselines: Mapping[str, torch.Tensor], rows: GatedRows,
                 targets: torch.Tensor, *, pack: bool | str, reference: torch.Tensor | None = None) -> torch.Tensor:
        """``[R]`` logits of gated ``rows``, in length groups (``pack``) where the batch's trimming check
        passes; rows that gate a padding position must come with ``pack=False``."""
        self.last_rows = len(rows.samples)
        padded = not all(bool(p.all()) for p in present_positions(features).values())
        trim = padded and pack is not False and self.trimming_allowed(features, pack, reference)
        return self.row_logits(features, baselines, rows, targets, pack=pack if trim else False)

    # -- the checks ---------------------------------------------------------------------------
    def padding_gates_matter(self, features: FeatureBatch, baselines: Mapping[str, torch.Tensor],
                             draws: Mapping[str, torch.Tensor], present: Mapping[str, torch.Tensor],
                             targets: torch.Tensor) -> bool:
        """Whether a few of the batch's draws (the empty one first) give other logits with their
        padding gated as drawn than with it left as input, at the batch's width."""
        chosen = {k: d[_check_draws(draws)] for k, d in draws.items()}
        results = []
        for rows in (gated_rows(chosen, None, features.size), gated_rows(chosen, present, features.size)):
            logits = self.row_logits(features, baselines, rows, targets, pack=False)
            results.append(logits[rows.inverse])
        return relative_difference(*results) > PADDING_RTOL

    def trimming_allowed(self, features: FeatureBatch, pack: bool | str, reference: torch.Tensor | None) -> bool:
        """The padding check of this batch (:func:`fastattr.interpret.perturbation.rows.trimming_allowed`),
        its samples called as every row calls the model: with PyHealth's masks appended."""
        def logits(part: FeatureBatch) -> torch.Tensor:
            with torch.no_grad():
                return logits_of(self.model.forward(**part.call())).float()
        return trimming_allowed(self.lengths, features, pack, logits, reference, method="perturbation")

    # -- running rows -------------------------------------------------------------------------
    def row_logits(self, features: FeatureBatch, baselines: Mapping[str, torch.Tensor], rows: GatedRows,
                   targets: torch.Tensor, *, pack: bool | str) -> torch.Tensor:
        """``[R]`` logits of each row's target (:func:`fastattr.interpret.perturbation.rows.run_rows`): at
        the batch's width in forwards of the batch's row count, or in length groups (``pack``)."""
        table = features.subset(rows.samples)
        bases = {k: features.cut(k, torch.as_tensor(b, device=table.value(k).device), rows.samples, None)
                 .expand(table.value(k).shape) for k, b in baselines.items()}
        chosen = targets[rows.samples.to(targets.device)]
        checked = torch.zeros(len(rows.samples), dtype=torch.bool)
        checked[rows.inverse[:CHECK_DRAWS].flatten().cpu()] = True  # the rows the once-per-layout check runs

        def scores(index: torch.Tensor, sizes: list[int] | None, part: FeatureBatch) -> torch.Tensor:
            gates = {k: g.index_select(0, index.to(g.device))[:, :part.value(k).shape[1]]
                     for k, g in rows.gates.items()}
            cut = {k: table.cut(k, b, index, sizes) for k, b in bases.items()}
            return self._logits(part, gates, cut, chosen[index.to(chosen.device)])
        key = layout_key(features, "perturbation", self.use_embeddings)
        return run_rows(self.lengths, table, key, scores, pack=pack, batch_rows=features.size, check_rows=checked,
                        method="perturbation")

    def _logits(self, part: FeatureBatch, gates: Mapping[str, torch.Tensor], bases: Mapping[str, torch.Tensor],
                targets: torch.Tensor) -> torch.Tensor:
        """One forward of gated rows: the target's logit per row."""
        embed = self.model.get_embedding_model() if self.use_embeddings else None
        values = {}
        for key in part.keys:
            x, b, token = part.value(key), bases[key], part.layouts[key].token
            if embed is not None and token:
                x, b = embed({key: x})[key], embed({key: b})[key]
            gate = gates[key].view(*gates[key].shape, *[1] * (x.dim() - 2)).to(x.device)
            value = torch.where(gate == 1, x, b)
            values[key] = embed({key: value})[key] if embed is not None and not token else value
        call = part.call(values)
        out = self.model.forward_from_embedding(**call) if embed is not None else self.model.forward(**call)
        return logits_of(out).float().gather(1, targets.view(-1, 1)).squeeze(1)


def _check_draws(draws: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Up to :data:`CHECK_DRAWS` draws for the padding-gate check: the empty one first (every
    padding position at the baseline) where drawn, then the first others."""
    total = next(iter(draws.values())).shape[0]
    empty = torch.stack([~d.bool().any(1) for d in draws.values()]).all(0).nonzero().flatten()[:1].cpu()
    rest = torch.tensor([i for i in range(min(total, CHECK_DRAWS + 1)) if i not in empty.tolist()], dtype=torch.long)
    return torch.cat([empty, rest])[:CHECK_DRAWS]
