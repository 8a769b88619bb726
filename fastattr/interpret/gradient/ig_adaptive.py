"""``IntegratedGradients`` with ``steps="auto"``: the adaptive rounds of :mod:`fastattr.core.adaptive`
over a whole batch, each round's rows run in length groups planned for the samples still
refining (so the few rows of a late round share forwards instead of one per group)."""
from __future__ import annotations

import collections
from typing import Any

import torch

from fastattr.core.adaptive import GRID, adaptive_delta, density_shapes, integrate_adaptively, run_listed_rows
from fastattr.core.chunks import RowBytes
from fastattr.core.integrated import IGOptions
from fastattr.interpret.features import FeatureBatch, scatter_rows
from fastattr.interpret.gradient.convergence import StepsReport
from fastattr.interpret.lengths import Group, GroupedTask, layout_key, place_rows


class AdaptiveRun:
    """One ``attribute`` call of ``steps="auto"``: ``ig``'s pieces (endpoints, forward, padding
    probe, length groups) applied to the rows each round lists."""

    def __init__(self, ig: Any, features: FeatureBatch, baselines: dict[str, torch.Tensor], embed: Any,
                 targets: torch.Tensor, options: IGOptions, mode: str, pack: Any, device: torch.device) -> None:
        self.ig, self.features, self.baselines, self.embed = ig, features, baselines, embed
        self.targets, self.options, self.mode, self.pack, self.device = targets, options, mode, pack, device
        self.shapes = density_shapes(ig._endpoints(features, baselines, embed)[0], ig._summed(features, embed))
        self.rows_used: int | None = None
        self.row_bytes: dict[int, RowBytes] = {}  # a row's input elements -> its activation bytes (probed)
        self.groups: list[Group] | None = None
        self.first = True
        self.probed: dict[bool, float] = {}  # the call's padding checks (at the baseline?), by its first trimmed round

    def run(self) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, int, StepsReport]:
        """Attributions (raw value shapes), the convergence delta when asked, rows per forward and
        each sample's points and estimated error."""
        result = integrate_adaptively(self.evaluate, self.features.size, self.options.auto)
        attributions = self.features.expand(result.attributions)
        delta = adaptive_delta(result.attributions, result.path_gap) if self.options.return_convergence_delta else None
        return attributions, delta, self.rows_used or 0, StepsReport(result.points, result.error)

    def evaluate(self, listed: list[tuple[int, int]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The listed (sample, grid position) rows' densities at the batch's full shapes and their
        target logits, run in length groups of the samples they belong to."""
        counts = collections.Counter(s for s, _ in listed)  # rows per sample: what the length groups weigh
        active = sorted(counts)
        local = {s: i for i, s in enumerate(active)}
        index = torch.tensor(active, dtype=torch.long)
        sub = self.features.subset(index)
        base = {k: self.features.cut(k, b, index, None) for k, b in self.baselines.items()}
        rows = [(local[s], point) for s, point in listed]
        place = self._place(len(rows))

        def run(group: Group | None, part: FeatureBatch) -> Any:
            done = self._rows(group, part, sub, base, index, rows)
            return done if group is not None else place([(None, part, done)])  # the padded batch: whole already
        task = GroupedTask(run, place, probe=lambda groups: self._probe(sub, base, groups, False),
                           own_probe=lambda groups: self._probe(sub, base, groups, True))
        (density, logit), groups = self.ig._lengths.execute(sub, layout_key(sub, self.embed is not None), task,
                                                            pack=self.pack, points=[counts[s] for s in active],
                                                            device=self.device,
                                                            method="adaptive_integrated_gradients")
        if self.first:
            self.groups, self.first = groups, False
        return density, logit

    def _probe(self, sub: FeatureBatch, base: dict[str, torch.Tensor], groups: list[Group], at_baseline: bool) -> float:
        """IG's padding checks, once per call: later rounds list rows of samples the first trimmed
        round checked (every sample of the call is in the first round)."""
        if at_baseline not in self.probed:
            self.probed[at_baseline] = self.ig._padding_difference(sub, base, self.embed, groups,
                                                                   at_baseline=at_baseline)
        return self.probed[at_baseline]

    def _rows(self, group: Group | None, part: FeatureBatch, sub: FeatureBatch, base: dict[str, torch.Tensor],
              index: torch.Tensor, rows: list[tuple[int, int]]) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """One group's rows: (their positions in the round's list, densities, target logits)."""
        members = list(range(sub.size)) if group is None else group[0].tolist()
        position = {s: i for i, s in enumerate(members)}
        mine = [r for r, (s, _) in enumerate(rows) if s in position]
        cut = base if group is None else {k: sub.cut(k, b, *group) for k, b in base.items()}
        xs, bs = self.ig._endpoints(part, cut, self.embed)
        samples = torch.tensor([position[rows[r][0]] for r in mine], dtype=torch.long, device=self.device)
        alphas = torch.tensor([rows[r][1] / GRID for r in mine], dtype=torch.float64, device=self.device)
        targets = self.targets[index.to(self.device)][torch.tensor(members, device=self.device)]
        width = sum(x[0].numel() for x in xs.values())  # a row's activation bytes depend on its size only
        density, logit, sizer = run_listed_rows(self.ig._forward(part, self.embed, self.mode), xs, bs, part.others(),
                                                self.options, samples, alphas, self.ig._summed(part, self.embed),
                                                targets, per_row=self.row_bytes.get(width))
        if sizer.per_row is not None:  # measured by a probe: later rounds at this width skip theirs
            self.row_bytes.setdefault(width, sizer.per_row)
        self.rows_used = max(self.rows_used or 0, sizer.rows)
        return torch.tensor(mine, dtype=torch.long), density, logit

    def _place(self, count: int):
        def place(parts: list) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
            density = {k: scatter_rows([(r[0], r[1][k]) for _, _, r in parts], (count, *shape))
                       for k, shape in self.shapes.items()}
            return density, place_rows(count, [(r[0], r[2]) for _, _, r in parts])
        return place
