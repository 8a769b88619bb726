"""Kernel SHAP, PyHealth 2.1.0's ``ShapExplainer`` as a drop-in: the same coalitions (PyHealth's draws
for the same ``random_seed``), the same kernel weights and the same regularised least-squares fit, so
the same attributions to float rounding. Only the model evaluations change: PyHealth runs one forward
of the whole padded batch per coalition; here a patient's distinct coalitions run once each, in length
groups (:mod:`fastattr.interpret.perturbation.engine`).

As in PyHealth, a patient's values depend on its batch: the coalitions are drawn over the batch's
padded positions (``M``, the features of every key along its first padded dim, gated for all
patients at once) and the kernel weights use ``M``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from fastattr.core.checks import check_count, check_non_negative, check_seed
from fastattr.interpret.features import FeatureBatch
from fastattr.interpret.interpretable import is_interpretable
from fastattr.interpret.perturbation.engine import PerturbationRunner, feature_counts, present_positions
from fastattr.interpret.perturbation.inputs import PerturbationExplainer
from fastattr.interpret.perturbation.shapley import enumerate_coalitions, exact_values

EDGE_WEIGHT = 1000.0  # PyHealth's weight of the empty and the full coalition


class ShapExplainer(PerturbationExplainer):
    """Kernel SHAP attributions, PyHealth 2.1.0's ``ShapExplainer`` (its arguments and defaults).

    Args:
        model: a model following the PyHealth protocol.
        use_embeddings: gate token features in embedding space (input against baseline embedding per
            position; ``forward_from_embedding``), continuous features in their values; else gate
            the raw values (``forward``).
        n_background_samples: kept for PyHealth's signature (PyHealth does not use it either).
        max_coalitions: coalitions per batch, the empty and the full one included (at most ``2**M``).
        regularization: the ridge term of the weighted least-squares fit.
        random_seed: seeds the coalitions' draws for each call (the caller's random state is left as
            it was); ``None`` draws from torch's global generator, as PyHealth does.
        pack_lengths: ``"auto" | True | False``: run rows in length groups where that is exact.
        exact: beyond PyHealth (opt-in): a patient whose ``n`` real positions have ``2**n <=
            max_coalitions`` coalitions gets exact Shapley values over its own positions (all its
            coalitions run, padding is no player and gets 0; :mod:`fastattr.interpret.perturbation.shapley`); the
            others get PyHealth's sampled estimate. ``last_exact`` says which patients were exact.

    """

    def __init__(self, model: torch.nn.Module, use_embeddings: bool = True, n_background_samples: int = 100,
                 max_coalitions: int = 1000, regularization: float = 1e-6, random_seed: int | None = 42, *,
                 pack_lengths: bool | str = "auto", exact: bool = False) -> None:
        """Check every option (a ``ValueError`` naming the one outside its domain) and the model; see the class."""
        if use_embeddings and not is_interpretable(model):
            raise ValueError("Model must implement Interpretable interface or use_embeddings must be False.")
        check_count("n_background_samples", n_background_samples)
        check_count("max_coalitions", max_coalitions)
        check_non_negative("regularization", regularization)
        check_seed("random_seed", random_seed)
        super().__init__(model, ("forward",), group_method="perturbation", compared="logits",
                         pack_lengths=pack_lengths)
        self.use_embeddings, self.n_background_samples = bool(use_embeddings), n_background_samples
        self.max_coalitions, self.regularization, self.random_seed = max_coalitions, float(regularization), random_seed
        self.exact = _check_flag("exact", exact)
        self.runner = PerturbationRunner(model, self._lengths, use_embeddings=self.use_embeddings)
        #: the last call's coalitions ``[N, M]`` (keys sorted) and their logits ``[N, B]``: what the fit regressed
        self.last_coalitions: torch.Tensor | None = None
        self.last_coalition_logits: torch.Tensor | None = None
        #: per patient of the last call, whether its values are exact Shapley values (``exact=True``)
        self.last_exact: torch.Tensor | None = None

    def attribute(self, baseline: Mapping[str, torch.Tensor] | None = None, target_class_idx: int | None = None,
                  **batch: Any) -> dict[str, torch.Tensor]:
        """SHAP values per feature key, in each raw value's shape (a position's value repeated over
        its trailing dims), as PyHealth computes them.

        Args:
            baseline: per feature key, what an absent position takes (token ids, embedded when
                ``use_embeddings``; continuous values); default PyHealth's: token id 1, values 0.01.
            target_class_idx: the class explained (default: each patient's predicted class; binary
                models explain their one logit).
            **batch: a PyHealth batch.
        """
        features, targets, baselines, call = self.prepare(batch, target_class_idx, baseline)
        counts = feature_counts(features)
        exact = enumerate_coalitions(present_positions(features), self.max_coalitions) if self.exact else None
        self.last_coalitions = self.last_coalition_logits = None
        if exact is None or len(exact.spans) < features.size:
            per_key = self._sampled(features, baselines, targets, counts, call.pack_lengths)
        else:  # every patient exact: no coalition is drawn
            per_key = {k: torch.zeros(features.size, n, device=targets.device) for k, n in counts.items()}
        self.last_exact = torch.zeros(features.size, dtype=torch.bool)
        if exact is not None and exact.spans:
            logits = self.runner.run_rows(features, baselines, exact.rows, targets, pack=call.pack_lengths,
                                          reference=self.last_logits)
            for sample, values in exact_values(exact, logits, counts).items():
                for key, value in values.items():
                    per_key[key][sample] = value.to(per_key[key].device)
                self.last_exact[sample] = True
        return features.expand(per_key)

    def _sampled(self, features: FeatureBatch, baselines: Mapping[str, torch.Tensor], targets: torch.Tensor,
                 counts: Mapping[str, int], pack: bool | str) -> dict[str, torch.Tensor]:
        """PyHealth's Kernel SHAP of the batch, per key ``[B, n_key]``."""
        keys = sorted(counts)
        coalitions = self._coalitions(sum(counts.values()), targets.device)
        draws = dict(zip(keys, coalitions.split([counts[k] for k in keys], dim=1), strict=True))
        preds = self.runner.run(features, baselines, draws, targets, pack=pack, reference=self.last_logits)
        self.last_coalitions, self.last_coalition_logits = coalitions, preds
        values = kernel_shap_fit(coalitions, preds.to(coalitions.device), self.regularization)
        return dict(zip(keys, values.split([counts[k] for k in keys], dim=1), strict=True))

    def _coalitions(self, total: int, device: torch.device) -> torch.Tensor:
        """``[N, M]`` float coalitions in PyHealth's order: empty, full, then ``torch.randint(2, (M,))``
        one draw each, from a generator seeded with ``random_seed`` (the global one when ``None``)."""
        count = min(2 ** total, self.max_coalitions)
        generator = None
        if self.random_seed is not None:
            generator = torch.Generator(device=device).manual_seed(self.random_seed)
        rows = [torch.zeros(total, device=device), torch.ones(total, device=device)]
        rows += [torch.randint(2, (total,), device=device, generator=generator).float()
                 for _ in range(max(0, count - 2))]
        return torch.stack(rows)


def kernel_weights(coalitions: torch.Tensor) -> torch.Tensor:
    """PyHealth's kernel weight per coalition, float32: ``(M - 1) / (C(M, z) z (M - z))`` for ``z`` of
    ``M`` features present, :data:`EDGE_WEIGHT` for the empty and the full one."""
    total = coalitions.shape[1]
    weights = []
    for z in coalitions.sum(1).round().long().tolist():
        weights.append(EDGE_WEIGHT if z in (0, total) else (total - 1) / (math.comb(total, z) * z * (total - z)))
    return torch.tensor(weights, dtype=torch.float32)


def kernel_shap_fit(coalitions: torch.Tensor, preds: torch.Tensor, regularization: float) -> torch.Tensor:
    """PyHealth's fit, ``[B, M]``: the kernel-weighted least squares of ``preds [N, B]`` on the
    ``coalitions [N, M]`` (in draw order), ``sqrt(regularization) * I`` rows appended, solved by
    ``torch.linalg.lstsq`` in float32 with its default driver, as PyHealth builds it.

    The system is ill-conditioned (weights 1,000 at the edges, down to ~1e-12 between), so its
    float32 solution depends on the solver, the row order and the float rounding of ``preds``: a
    float64 solve differs from PyHealth's by 5-16% of the largest value, while logits off by 1e-7
    relative move it by ~2e-5 (measured, tests/test_parity_shap.py). So the drop-in keeps
    PyHealth's construction exactly."""
    device = coalitions.device
    sqrt_w = torch.sqrt(kernel_weights(coalitions).to(device)).unsqueeze(1)
    total = coalitions.shape[1]
    reg = torch.sqrt(torch.tensor(regularization, device=device)) * torch.eye(total, device=device)
    x = torch.cat([sqrt_w * coalitions, reg], dim=0)
    y = torch.cat([sqrt_w * preds, torch.zeros((total, preds.shape[1]), device=device)], dim=0)
    return torch.linalg.lstsq(x, y).solution.transpose(0, 1)


def _check_flag(name: str, value: object) -> bool:
    """``value`` if it is a bool, else ``ValueError`` naming ``name``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False; got {value!r}")
    return value
