"""LIME, PyHealth 2.1.0's ``LimeExplainer`` as a drop-in: the same perturbations (PyHealth's draws for
the same ``random_seed``), the same similarity weights and the same regularised least-squares fit per
patient, so the same attributions to float rounding. Only the model evaluations change: PyHealth runs
one forward of the whole padded batch per perturbation; here a patient's distinct perturbations run
once each, in length groups (:mod:`fastattr.interpret.perturbation.engine`).

As in PyHealth, a patient's values depend on its batch: a perturbation gates every position of the
batch's padded widths for all patients at once, and the similarity of a perturbed patient to itself
is measured over its padded input (padding positions included). PyHealth's ``"lasso"`` is not an L1
solver: it is the least squares with ``alpha * I`` rows appended (``"ridge"`` appends
``sqrt(alpha) * I``); the drop-in keeps that.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fastattr.core.checks import check_choice, check_count, check_non_negative, check_positive, check_seed
from fastattr.interpret.features import FeatureBatch
from fastattr.interpret.interpretable import require_interpretable
from fastattr.interpret.perturbation.engine import PerturbationRunner, feature_counts
from fastattr.interpret.perturbation.inputs import PerturbationExplainer

DISTANCE_MODES = ("cosine", "euclidean")
FEATURE_SELECTIONS = ("lasso", "ridge", "none")
# Elements of perturbed inputs one similarity chunk builds (draws x patients x flattened input).
SIMILARITY_ELEMENTS = 1 << 24


class LimeExplainer(PerturbationExplainer):
    """LIME attributions, PyHealth 2.1.0's ``LimeExplainer`` (its arguments and defaults).

    Args:
        model: a model following the PyHealth protocol with ``forward_from_embedding`` and
            ``get_embedding_model`` (PyHealth refuses any other, whatever ``use_embeddings``).
        use_embeddings: gate token features in embedding space (input against baseline embedding per
            position; ``forward_from_embedding``), continuous features in their values; else gate
            the raw values (``forward``).
        n_samples: perturbations per batch.
        kernel_width: width of the exponential kernel ``exp(-d**2 / (2 * kernel_width**2))`` that
            weighs a perturbation by its distance ``d`` to the input (positive).
        distance_mode: ``"cosine"`` (``1 - cos``) or ``"euclidean"``.
        feature_selection: ``"lasso"`` (PyHealth's: ``alpha * I`` rows appended, an L2 penalty),
            ``"ridge"`` (``sqrt(alpha) * I`` rows) or ``"none"`` (plain least squares).
        alpha: the regularisation strength (>= 0).
        random_seed: seeds the perturbations' draws for each call (the caller's random state is left
            as it was); ``None`` draws from torch's global generator, as PyHealth does.
        pack_lengths: ``"auto" | True | False``: run rows in length groups where that is exact.

    """

    def __init__(self, model: torch.nn.Module, use_embeddings: bool = True, n_samples: int = 1000,
                 kernel_width: float = 0.25, distance_mode: str = "cosine", feature_selection: str = "lasso",
                 alpha: float = 0.01, random_seed: int | None = 42, *, pack_lengths: bool | str = "auto") -> None:
        """Check every option (a ``ValueError`` naming the one outside its domain) and the model; see the class."""
        require_interpretable(model, bool(use_embeddings))
        check_count("n_samples", n_samples)
        check_positive("kernel_width", kernel_width)
        check_choice("distance_mode", distance_mode, DISTANCE_MODES)
        check_choice("feature_selection", feature_selection, FEATURE_SELECTIONS)
        check_non_negative("alpha", alpha)
        check_seed("random_seed", random_seed)
        super().__init__(model, ("forward",), group_method="perturbation", compared="logits",
                         pack_lengths=pack_lengths)
        self.use_embeddings, self.n_samples, self.kernel_width = bool(use_embeddings), n_samples, float(kernel_width)
        self.distance_mode, self.feature_selection = distance_mode, feature_selection
        self.alpha, self.random_seed = float(alpha), random_seed
        self.runner = PerturbationRunner(model, self._lengths, use_embeddings=self.use_embeddings)
        #: the last call's perturbations ``[N, M]`` (keys sorted), their logits and weights ``[N, B]``
        self.last_perturbations: torch.Tensor | None = None
        self.last_perturbation_logits: torch.Tensor | None = None
        self.last_weights: torch.Tensor | None = None

    def attribute(self, baseline: Mapping[str, torch.Tensor] | None = None, target_class_idx: int | None = None,
                  **batch: Any) -> dict[str, torch.Tensor]:
        """LIME coefficients per feature key, in each raw value's shape (a position's value repeated
        over its trailing dims), as PyHealth computes them.

        Args:
            baseline: per feature key, what an absent position takes (token ids, embedded when
                ``use_embeddings``; continuous values); default PyHealth's: token id 1, values 0.01.
            target_class_idx: the class explained (default: each patient's predicted class; binary
                models explain their one logit).
            **batch: a PyHealth batch.
        """
        features, targets, baselines, call = self.prepare(batch, target_class_idx, baseline)
        counts = feature_counts(features)
        order = [k for k in batch if k in counts]  # PyHealth draws per key in the batch's order
        device = self._draw_device(batch, features, order[0])  # PyHealth's draws and results live there
        draws = self._perturbations(order, counts, device)
        on_model = {k: d.to(targets.device) for k, d in draws.items()}  # the rows run where the model is
        preds = self.runner.run(features, baselines, on_model, targets, pack=call.pack_lengths,
                                reference=self.last_logits)
        with torch.no_grad():
            weights = self._weights(features, baselines, draws)
        keys = sorted(counts)
        samples = torch.cat([draws[k] for k in keys], dim=1).float()
        self.last_perturbations, self.last_perturbation_logits, self.last_weights = samples, preds, weights
        cpu = torch.device("cpu")
        values = lime_fit(samples.to(cpu), preds.detach().to(cpu), weights.to(cpu), self.feature_selection,
                          self.alpha).to(device)
        per_key = dict(zip(keys, values.split([counts[k] for k in keys], dim=1), strict=True))
        return features.expand(per_key)

    def _perturbations(self, order: list[str], counts: Mapping[str, int],
                       device: torch.device) -> dict[str, torch.Tensor]:
        """Per key ``[N, n_key]`` gates in PyHealth's order: per perturbation, per key in ``order``,
        one ``torch.bernoulli(0.5 * ones(n_key))``, from a generator seeded with ``random_seed``
        (torch's global one when ``None``)."""
        generator = None
        if self.random_seed is not None:
            generator = torch.Generator(device=device).manual_seed(self.random_seed)
        rows: dict[str, list[torch.Tensor]] = {k: [] for k in order}
        for _ in range(self.n_samples):
            for key in order:
                half = torch.ones(counts[key], device=device) * 0.5
                rows[key].append(torch.bernoulli(half, generator=generator))
        return {k: torch.stack(v) for k, v in rows.items()}

    def _draw_device(self, batch: Mapping[str, Any], features: FeatureBatch, first: str) -> torch.device:
        """Where PyHealth draws: the device of the first key's value as it gates it (a token key's
        embedding when ``use_embeddings``, else the value as the caller passed it)."""
        layout = features.layouts[first]
        if self.use_embeddings and layout.token:
            return features.value(first).device
        value = layout.value(layout.parts(batch[first]))
        return value.device if isinstance(value, torch.Tensor) else features.value(first).device

    def _weights(self, features: FeatureBatch, baselines: Mapping[str, torch.Tensor],
                 draws: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``[N, B]`` similarity weights of every perturbation of every patient, over the gated inputs
        as PyHealth measures them (token keys embedded when ``use_embeddings``, continuous raw)."""
        inputs, bases = features.values(), dict(baselines)
        if self.use_embeddings:
            embed = self.model.get_embedding_model()
            tokens = [k for k in features.keys if features.layouts[k].token]
            if tokens:
                inputs.update(embed({k: inputs[k] for k in tokens}))
                bases.update(embed({k: bases[k] for k in tokens}))
        return similarity_weights(inputs, bases, draws, self.distance_mode, self.kernel_width)


def similarity_weights(inputs: Mapping[str, torch.Tensor], baselines: Mapping[str, torch.Tensor],
                       draws: Mapping[str, torch.Tensor], distance_mode: str, kernel_width: float) -> torch.Tensor:
    """``[N, B]``: ``exp(-d**2 / (2 kernel_width**2))`` with ``d`` the distance between patient ``b``'s
    input and its perturbation ``n`` (``where(gate, input, baseline)`` per position), both flattened
    over the keys in sorted order, as PyHealth's ``_compute_similarity`` takes it (float32;
    ``1 - cos`` with eps 1e-8, or the Euclidean norm). Built in chunks of perturbations."""
    keys = sorted(draws)
    size = inputs[keys[0]].shape[0]
    flat = torch.cat([inputs[k].reshape(size, -1).float() for k in keys], dim=1)
    total = draws[keys[0]].shape[0]
    chunk = max(1, SIMILARITY_ELEMENTS // max(1, flat.numel()))
    out = []
    for start in range(0, total, chunk):
        parts = []
        for key in keys:
            x = inputs[key]
            gate = draws[key][start:start + chunk].to(x.device)
            gate = gate.view(gate.shape[0], 1, gate.shape[1], *[1] * (x.dim() - 2))
            base = torch.as_tensor(baselines[key], device=x.device).expand_as(x)
            parts.append(torch.where(gate == 1, x.unsqueeze(0), base.unsqueeze(0)).reshape(len(gate), size, -1).float())
        perturbed = torch.cat(parts, dim=2)
        if distance_mode == "cosine":
            distance = 1 - torch.nn.functional.cosine_similarity(flat.expand_as(perturbed), perturbed, dim=-1)
        else:
            distance = torch.linalg.vector_norm(flat - perturbed, dim=-1)
        out.append(torch.exp(-1 * (distance ** 2) / (2 * (kernel_width ** 2))))
    return torch.cat(out)


def lime_fit(samples: torch.Tensor, preds: torch.Tensor, weights: torch.Tensor, feature_selection: str,
             alpha: float) -> torch.Tensor:
    """PyHealth's fit, ``[B, M]``: per patient the least squares of ``sqrt(w) * preds`` on
    ``sqrt(w) * samples`` (``samples [N, M]``, ``preds`` and ``weights [N, B]``), ``alpha * I``
    (lasso) or ``sqrt(alpha) * I`` (ridge) rows appended, by ``torch.linalg.lstsq`` in float32 with
    its default driver; every patient's system solved in one batched call (the same solution as
    PyHealth's call per patient: LAPACK solves a batch one matrix at a time)."""
    total = samples.shape[1]
    root = torch.sqrt(weights).transpose(0, 1)  # [B, N]
    x = root.unsqueeze(2) * samples.unsqueeze(0)
    y = root * preds.transpose(0, 1)
    if feature_selection != "none":
        scale = alpha if feature_selection == "lasso" else torch.sqrt(torch.tensor(alpha))
        reg = (scale * torch.eye(total)).expand(x.shape[0], total, total)
        x = torch.cat([x, reg], dim=1)
        y = torch.cat([y, torch.zeros(y.shape[0], total)], dim=1)
    return torch.linalg.lstsq(x, y.unsqueeze(-1)).solution.squeeze(-1)
