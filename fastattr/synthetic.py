"""Seeded synthetic clinical-code cohorts whose label depends on known, planted codes."""
from __future__ import annotations

from dataclasses import dataclass

import torch

PAD, UNK, FIRST_CODE = 0, 1, 2


@dataclass
class Cohort:
    """Padded code sequences, labels and the truth that generated them.

    ``codes[p]`` holds patient ``p``'s codes (0 = padding). ``planted`` maps a code id to the
    log-odds it adds to the label when present.
    """

    codes: torch.Tensor
    labels: torch.Tensor
    planted: dict[int, float]
    names: list[str]

    def __len__(self) -> int:
        return self.codes.shape[0]

    def batch(self, index: slice | torch.Tensor) -> dict[str, torch.Tensor]:
        return {"codes": self.codes[index], "label": self.labels[index]}


def make_cohort(patients: int = 2000, vocab: int = 300, length: int = 40, planted: int = 6,
                seed: int = 0) -> Cohort:
    """Patients with a long-tailed (Zipf) code frequency and variable lengths.

    ``planted`` codes of middling frequency each add a log-odds of 2.5 to 4 when present; every
    other code adds nothing. Labels are drawn from the resulting logistic model, so the truth is
    known per patient: the planted codes they carry.
    """
    if patients < 1 or vocab < planted + 10 or length < 2:
        raise ValueError("need patients >= 1, vocab >= planted + 10 and length >= 2")
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
    freq = 1.0 / ranks ** 1.1
    ids = torch.multinomial(freq.expand(patients, -1), length, replacement=True, generator=g) + FIRST_CODE
    lengths = torch.randint(length // 4, length + 1, (patients,), generator=g)
    codes = torch.where(torch.arange(length) < lengths[:, None], ids, torch.full_like(ids, PAD))
    candidates = torch.arange(10, 10 + 4 * planted, 4) + FIRST_CODE
    effects = 2.5 + 1.5 * torch.rand(planted, generator=g, dtype=torch.float64)
    truth = {int(c): float(e) for c, e in zip(candidates, effects)}
    present = torch.stack([(codes == c).any(1) for c in truth], dim=1).double()
    logit = present @ effects - 1.5
    labels = (torch.rand(patients, generator=g, dtype=torch.float64) < torch.sigmoid(logit)).long()
    names = ["<pad>", "<unk>"] + [f"C{c:04d}" for c in range(FIRST_CODE, vocab + FIRST_CODE)]
    return Cohort(codes=codes, labels=labels, planted=truth, names=names)
