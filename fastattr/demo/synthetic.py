"""Seeded synthetic clinical-code cohorts whose label depends on known, planted codes.

Every patient is generated on demand from ``(seed, patient index)`` alone, so a cohort of any
size (hundreds to millions) costs nothing until its patients are read, and the same seed always
gives the same cohort. Each patient has visits of diagnosis, procedure and medication codes
drawn from a long-tailed (Zipf) frequency. The label follows a known logistic model:

    logit = bias + sum(effect of each planted code present)
                 + sum(effect of each planted pair with both codes present)

and each planted code has a *distractor*: a code with no effect that tends to appear with it,
so an attribution method that follows correlation rather than the model is caught out.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fastattr.core.checks import check_choice

PAD, UNK, FIRST_CODE = 0, 1, 2
CODE_TYPES = ("D", "P", "M")  # diagnosis, procedure, medication


def long_tailed_lengths(count: int, median: float = 15.0, sigma: float = 1.0, longest: int = 512,
                        seed: int = 0) -> list[int]:
    """``count`` lengths drawn log-normal (``median``, log-space ``sigma``), clipped to [1, ``longest``]:
    most patients short, a few long, as in real clinical cohorts."""
    if count < 0 or median <= 0 or sigma < 0 or longest < 1:
        raise ValueError(f"need count >= 0, median > 0, sigma >= 0, longest >= 1; got {count}, {median}, {sigma}, "
                         f"{longest}")
    rng = np.random.default_rng([seed, 0x1E6])
    raw = rng.lognormal(mean=np.log(median), sigma=sigma, size=count)
    return np.clip(np.rint(raw), 1, longest).astype(int).tolist()


@dataclass(frozen=True)
class Truth:
    """What generated the labels: effects in log-odds."""

    planted: dict[int, float]
    pairs: dict[tuple[int, int], float]
    distractors: dict[int, int]  # distractor code -> the planted code it follows
    bias: float

    def logit(self, codes: set[int]) -> float:
        """The label's log-odds for a patient carrying ``codes``."""
        value = self.bias + sum(e for c, e in self.planted.items() if c in codes)
        return value + sum(e for (a, b), e in self.pairs.items() if a in codes and b in codes)

    @property
    def causal_codes(self) -> set[int]:
        return set(self.planted) | {c for pair in self.pairs for c in pair}


@dataclass
class SyntheticCohort:
    """A lazily generated cohort; ``cohort.batch(range(0, 64))`` gives model-ready tensors.

    Args:
        patients: cohort size.
        vocab: codes per type (diagnosis, procedure, medication); ids start at 2 (0 = padding,
            1 = unknown).
        visits: (min, max) visits per patient.
        codes_per_visit: (min, max) codes per visit.
        planted: number of single planted codes (log-odds 1.5 to 2.5 each).
        pairs: number of planted pairs (log-odds 2.0 to 3.0 when both codes are present).
        zipf: exponent of the code frequency.
        seed: the cohort's seed.
        lengths: ``"uniform"`` (visits and codes per visit drawn uniformly from their ranges) or
            ``"lognormal"``: each patient's number of codes drawn log-normal with median
            ``median_codes`` and log-space spread ``sigma``, capped at ``longest``, as real
            cohorts are long-tailed (most patients short, a few with hundreds of codes); visits
            of ``codes_per_visit`` codes are added until the patient has that many.
    """

    patients: int = 2000
    vocab: int = 100
    visits: tuple[int, int] = (2, 6)
    codes_per_visit: tuple[int, int] = (2, 6)
    planted: int = 4
    pairs: int = 2
    zipf: float = 1.1
    seed: int = 0
    lengths: str = "uniform"
    median_codes: float = 15.0
    sigma: float = 1.0
    longest: int = 512
    truth: Truth = field(init=False)
    names: list[str] = field(init=False)

    def __post_init__(self) -> None:
        if self.patients < 1:
            raise ValueError(f"patients must be >= 1; got {self.patients}")
        if self.vocab < 40 or 2 * self.planted + 2 * self.pairs > 3 * 25:
            raise ValueError(f"need vocab >= 40 and 2 * planted + 2 * pairs <= 75; got vocab={self.vocab}, "
                             f"planted={self.planted}, pairs={self.pairs}")
        for name in ("visits", "codes_per_visit"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be (min, max) with 1 <= min <= max; got {(lo, hi)}")
        check_choice("lengths", self.lengths, ("uniform", "lognormal"))
        if self.median_codes <= 0 or self.sigma < 0 or self.longest < 1:
            raise ValueError(f"need median_codes > 0, sigma >= 0 and longest >= 1; got {self.median_codes}, "
                             f"{self.sigma}, {self.longest}")
        total = 3 * self.vocab
        self.names = ["<pad>", "<unk>"] + [f"{CODE_TYPES[i // self.vocab]}{i % self.vocab:03d}" for i in range(total)]
        ranks = np.arange(1, self.vocab + 1, dtype=np.float64)
        freq = 1.0 / ranks ** self.zipf
        self._freq = np.tile(freq / freq.sum(), 3) / 3.0
        rng = np.random.default_rng([self.seed, 0xC0DE])
        # Causal codes and distractors sit at middling frequency (ranks 5-30 of their type):
        # common enough to be learned, rare enough that most patients carry at most a few.
        candidates = np.array([t * self.vocab + r for t in range(3) for r in range(5, 30)])
        chosen = (rng.choice(candidates, size=2 * self.planted + 2 * self.pairs, replace=False) + FIRST_CODE).tolist()
        singles, rest = chosen[: self.planted], chosen[self.planted:]
        pair_codes, decoys = rest[: 2 * self.pairs], rest[2 * self.pairs:]
        self.truth = Truth(
            planted={c: float(rng.uniform(1.5, 2.5)) for c in singles},
            pairs={(a, b): float(rng.uniform(2.0, 3.0))
                   for a, b in zip(pair_codes[::2], pair_codes[1::2], strict=False)},
            distractors=dict(zip(decoys, singles, strict=False)),
            bias=-2.0,
        )
        # planted pairs are placed together in some patients, so the interaction is learnable
        self._pair_rate = 0.08

    def __len__(self) -> int:
        return self.patients

    def patient(self, index: int) -> tuple[list[list[int]], int]:
        """Visits (lists of code ids) and label of patient ``index``."""
        if not 0 <= index < self.patients:
            raise IndexError(f"patient {index} is outside a cohort of {self.patients}")
        rng = np.random.default_rng([self.seed, index])
        visits = []
        if self.lengths == "lognormal":
            wanted = int(np.clip(np.rint(rng.lognormal(np.log(self.median_codes), self.sigma)), 1, self.longest))
            while sum(map(len, visits)) < wanted:
                n_codes = int(rng.integers(self.codes_per_visit[0], self.codes_per_visit[1] + 1))
                n_codes = min(n_codes, wanted - sum(map(len, visits)))
                visits.append((rng.choice(self._freq.size, size=n_codes, p=self._freq) + FIRST_CODE).tolist())
        else:
            for _ in range(int(rng.integers(self.visits[0], self.visits[1] + 1))):
                n_codes = int(rng.integers(self.codes_per_visit[0], self.codes_per_visit[1] + 1))
                visits.append((rng.choice(self._freq.size, size=n_codes, p=self._freq) + FIRST_CODE).tolist())
        n_visits = len(visits)
        for a, b in self.truth.pairs:
            if rng.random() < self._pair_rate:
                visits[int(rng.integers(n_visits))] += [a, b]
        present = {c for v in visits for c in v}
        for distractor, planted in self.truth.distractors.items():
            if planted in present and rng.random() < 0.7:
                visits[int(rng.integers(n_visits))].append(distractor)
        present = {c for v in visits for c in v}
        label = int(rng.random() < 1.0 / (1.0 + np.exp(-self.truth.logit(present))))
        return visits, label

    def annotations(self, key: str = "codes") -> dict[str, dict[str, str]]:
        """``{key: {code name: "planted" | "planted pair" | "distractor"}}``: the truth, as
        ``attribute_dataset(annotations=...)`` stores it for reports."""
        marks = {self.names[c]: "planted" for c in self.truth.planted}
        marks.update({self.names[c]: "planted pair" for pair in self.truth.pairs for c in pair})
        marks.update({self.names[c]: "distractor" for c in self.truth.distractors})
        return {key: marks}

    @property
    def max_codes(self) -> int:
        """Length of the flat code sequence every batch is padded to."""
        most = self.longest if self.lengths == "lognormal" else self.visits[1] * self.codes_per_visit[1]
        return most + 2 * self.pairs + len(self.truth.distractors)

    def batch(self, indices, pad_to_longest: bool = False) -> dict[str, torch.Tensor]:
        """``{"codes": LongTensor [B, max_codes] (visits concatenated, 0-padded), "label": [B]}``;
        with ``pad_to_longest`` the codes are padded only to the batch's longest patient."""
        indices = list(indices)
        rows, labels = [], torch.zeros(len(indices), dtype=torch.long)
        for row, index in enumerate(indices):
            visits, labels[row] = self.patient(int(index))
            rows.append([c for v in visits for c in v][: self.max_codes])
        width = max(map(len, rows), default=0) if pad_to_longest else self.max_codes
        codes = torch.zeros(len(indices), max(width, 1), dtype=torch.long)
        for row, flat in enumerate(rows):
            codes[row, : len(flat)] = torch.tensor(flat, dtype=torch.long)
        return {"codes": codes, "label": labels}


class CohortDataset(torch.utils.data.Dataset):
    """A :class:`fastattr.demo.synthetic.SyntheticCohort` (or the patients ``indices`` of it) as a
    map-style dataset of patient dicts; ``patient_id`` is ``P`` and the patient's cohort index.

    Items hold the codes padded to the cohort's ``max_codes`` (so the default collate works);
    pass ``collate_fn=CohortDataset.collate`` to pad each batch only to its own longest patient.
    """

    def __init__(self, cohort: Any, indices: Sequence[int] | None = None) -> None:
        self.cohort = cohort
        self.indices = list(range(len(cohort))) if indices is None else [int(i) for i in indices]
        if any(not 0 <= i < len(cohort) for i in self.indices):
            raise IndexError(f"indices must lie in [0, {len(cohort)}) (the cohort's patients)")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        patient = self.indices[index]
        row = self.cohort.batch([patient])
        return {"patient_id": f"P{patient:08d}", "codes": row["codes"][0], "label": row["label"][0]}

    @staticmethod
    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        """Stack items, then cut the codes after the batch's last non-padding column."""
        batch = torch.utils.data.default_collate(items)
        codes = batch["codes"]
        used = (codes != 0).any(dim=0).nonzero()
        batch["codes"] = codes[:, : int(used.max()) + 1 if len(used) else 1]
        return batch
