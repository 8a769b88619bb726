"""Drop-in replacement for ``pyhealth.interpret.methods.IntegratedGradients``."""
from __future__ import annotations

from typing import Any

import torch

from fastattr.core.checks import check_auto_options
from fastattr.core.integrated import IGResult, check_baseline, check_finite, resolve_options, run_integrated_gradients
from fastattr.core.precision import model_precision
from fastattr.core.targets import resolve_targets
from fastattr.interpret.base import Interpreter
from fastattr.interpret.features import FeatureBatch, model_device, require_methods
from fastattr.interpret.gradient.convergence import StepsReport, warn_unconverged
from fastattr.interpret.gradient.ig_adaptive import AdaptiveRun
from fastattr.interpret.lengths import Group, GroupedTask, layout_key, place_rows, relative_difference
from fastattr.interpret.outputs import logits_of


class IntegratedGradients(Interpreter):
    """Integrated gradients for PyHealth-protocol models, all path steps batched.

    Same constructor, ``attribute`` signature and results (to float rounding) as PyHealth 2.1.0's
    ``IntegratedGradients``: masks appended when the schema has none, UNK-token (1) baselines for
    token features and 0.01 for continuous ones, token features interpolated in embedding space
    and summed over the embedding dim, continuous features embedded inside each step. The path
    points run as a few large forwards with input-only gradients instead of one forward and
    backward per step, and samples run in groups of similar length, each padded only to its own
    longest (padding positions get exact zeros, as in PyHealth).

    Args:
        model: a model following the PyHealth protocol (``feature_keys``,
            ``dataset.input_processors``, ``forward``, ``forward_from_embedding``,
            ``get_embedding_model``). It is put in eval mode.
        use_embeddings: interpolate token features in embedding space (PyHealth's default).
        steps: default number of path subintervals, or ``"auto"``: each sample's path refined
            until its estimated relative error is under ``tolerance`` (:mod:`fastattr.core.adaptive`).
        tolerance: the default relative tolerance of ``steps="auto"`` (``None``: 1e-3).
        backend: default backend, ``"auto" | "torch" | "triton"``; ``None`` reads ``FASTATTR_BACKEND``.
        pack_lengths: ``"auto"`` (default): run samples in length groups once a check shows the
            model's logits ignore padding (checked once per model and feature layout; a model
            that fails runs padded, with a warning); ``True``: the same, but a failed check is an
            error; ``False``: always run the padded batch.
        precision: the model's arithmetic, ``"fp32"`` (default: exact, PyHealth's), ``"tf32"`` or
            ``"bf16"`` (:mod:`fastattr.core.precision`; the path, the accumulation and the delta
            stay float32).
    """

    def __init__(self, model: torch.nn.Module, use_embeddings: bool = True, steps: int | str = 50, *,
                 tolerance: float | None = None, backend: str | None = None, pack_lengths: bool | str = "auto",
                 precision: str = "fp32") -> None:
        super().__init__(model, ("forward",), group_method="integrated_gradients", compared="logits", backend=backend,
                         pack_lengths=pack_lengths, precision=precision)
        if use_embeddings:
            require_methods(model, ("forward_from_embedding", "get_embedding_model"),
                            "IntegratedGradients with use_embeddings=True")
        check_auto_options(steps, tolerance, None)
        self.use_embeddings = use_embeddings
        self.steps = steps
        self.tolerance = tolerance
        #: rows per forward the last ``attribute`` call settled on (the largest over its groups)
        self.last_internal_batch_size: int | None = None
        #: path points each sample of the last call took (``[B]``; the rule's count for a fixed rule)
        self.last_steps: torch.Tensor | None = None
        #: each sample's estimated relative error in the last ``steps="auto"`` call (else ``None``)
        self.last_error_estimates: torch.Tensor | None = None

    def attribute(
        self,
        baseline: dict[str, torch.Tensor] | None = None,
        steps: int | str | None = None,
        target_class_idx: int | torch.Tensor | None = None,
        *,
        tolerance: float | None = None,
        internal_batch_size: int | None = None,
        method: str | None = None,
        return_convergence_delta: bool = False,
        backend: str | None = None,
        progress: bool | None = None,
        pack_lengths: bool | str | None = None,
        precision: str | None = None,
        **batch: Any,
    ) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Attributions per feature key, each of the raw input value's shape.

        Args:
            baseline: per feature key, a baseline in raw input space (token ids for token
                features); ``None`` gives PyHealth's defaults.
            steps: path subintervals, or ``"auto"`` (default: the constructor's ``steps``).
                ``"auto"`` refines each sample's path in adaptive Simpson panels, reusing every
                evaluation, until the estimated error of its whole attribution is at most
                ``tolerance`` times its norm, at most 129 points per sample (one warning names
                the samples left above; ``last_steps`` and ``last_error_estimates`` give each
                sample's points and estimate). It does not reproduce PyHealth's numbers: it
                approximates the exact integral, which PyHealth's 50-step rule misses by ~2%.
            target_class_idx: class to explain, an int or one class per sample (tensor, array,
                list); ``None`` takes the argmax of the model's logits. Ignored for a single logit.
            internal_batch_size: rows (sample x path point) per forward; results do not depend on it.
                Default: on CUDA all rows of a length group (halved on out-of-memory); on the CPU
                sized from the activation bytes of a one-point probe.
            tolerance: relative tolerance of ``steps="auto"`` (default: the constructor's, else 1e-3).
            method: quadrature rule of an integer ``steps`` (default ``"uniform"``, PyHealth's:
                steps + 1 equal-weight points); not with ``steps="auto"``.
            return_convergence_delta: also return, per sample, ``sum(attributions) - (f(x) - f(b))``.
            backend: ``"auto" | "torch" | "triton"`` for this call.
            progress: progress bar over the path (``None``: only on a terminal).
            pack_lengths: ``"auto" | True | False`` for this call (default: the constructor's).
            precision: ``"fp32" | "tf32" | "bf16"`` for this call (default: the constructor's).
            **batch: a dataloader batch; entries that are not feature keys are ignored.
        """
        model = self.model
        device, call = self.begin(batch, backend, pack_lengths, precision)
        pack, mode = call.pack_lengths, call.precision
        steps = self.steps if steps is None else steps
        if tolerance is None and steps == "auto":
            tolerance = self.tolerance
        options = resolve_options(steps=steps, method=method, tolerance=tolerance,
                                  internal_batch_size=internal_batch_size, backend=call.backend, device=device,
                                  return_convergence_delta=return_convergence_delta, progress=progress)
        features = FeatureBatch.from_batch(model, batch, device=device)
        for key, value in features.values().items():
            check_finite(f"batch[{key!r}]", value)
        baselines = self._baselines(baseline, features)

        # float32 in every mode: the class explained and the probabilities stored are fp32's
        _, targets = self.forward_as_given(
            features, lambda out: resolve_targets(target_class_idx, out, features.size, out.shape[1], device))

        embed = None
        if self.use_embeddings:
            embed = model.get_embedding_model()
            if embed is None:
                raise TypeError("IntegratedGradients with use_embeddings=True needs model.get_embedding_model() "
                                "to return the embedding module; it returned None")
        if options.auto:
            auto = AdaptiveRun(self, features, baselines, embed, targets, options, mode, pack, device)
            (attributions, delta, rows, steps_report), groups = auto.run(), auto.groups
        else:
            task = self._task(features, baselines, embed, targets, options, mode)
            (attributions, delta, rows, steps_report), groups = self._lengths.execute(
                features, layout_key(features, embed is not None), task,
                pack=pack, points=len(options.alphas), device=device)
        self.last_groups = [(features.size, None)] if groups is None else [(len(i), sizes) for i, sizes in groups]
        self.last_internal_batch_size = rows
        self.last_steps, self.last_error_estimates = steps_report.points, steps_report.error
        if options.auto:
            warn_unconverged(steps_report, options.auto, batch.get("patient_id"))
        return (attributions, delta) if return_convergence_delta else attributions

    # -- pieces ------------------------------------------------------------------------------
    def _task(self, features: FeatureBatch, baselines: dict[str, torch.Tensor], embed: Any, targets: torch.Tensor,
              options: Any, mode: str) -> GroupedTask:
        """IG on a length group (or the padded batch), its putting back, and its padding check (the
        endpoint logits, probed before any group runs)."""
        device = targets.device

        def run(group: Group | None, part: FeatureBatch) -> tuple[dict[str, torch.Tensor], Any, int, StepsReport]:
            cut = baselines if group is None else {k: features.cut(k, b, *group) for k, b in baselines.items()}
            result: IGResult = run_integrated_gradients(
                self._forward(part, embed, mode), *self._endpoints(part, cut, embed), options,
                targets=targets if group is None else targets[group[0].to(device)], extra=part.others(),
                sum_last_dim=self._summed(part, embed))
            return part.expand(result.attributions), result.delta, result.chunk_rows, \
                StepsReport.of(result, part.size, len(options.alphas))

        def place(parts: list) -> tuple[dict[str, torch.Tensor], Any, int, StepsReport]:
            delta = place_rows(features.size, [(i, r[1]) for i, _, r in parts]) if options.return_convergence_delta \
                else None
            return (features.place([(i, r[0]) for i, _, r in parts]), delta, max(r[2] for _, _, r in parts),
                    StepsReport.placed(features.size, [(i, r[3]) for i, _, r in parts]))

        def probe(groups: list[Group]) -> float:
            return self._padding_difference(features, baselines, embed, groups, at_baseline=False)

        def own_probe(groups: list[Group]) -> float:
            return self._padding_difference(features, baselines, embed, groups, at_baseline=True)
        return GroupedTask(run, place, probe=probe, own_probe=own_probe)

    def _embedded(self, part: FeatureBatch, embed: Any) -> set[str]:
        return part.token_keys() if embed is not None else set()

    def _summed(self, part: FeatureBatch, embed: Any) -> set[str]:
        return {k for k in self._embedded(part, embed) if part.value(k).dim() >= 2}

    def _endpoints(self, part: FeatureBatch, baselines: dict[str, torch.Tensor], embed: Any):
        """Input and baseline per key in the space the path runs in (token features embedded)."""
        values = part.values()
        tokens = self._embedded(part, embed)
        xs = {k: v if v.is_floating_point() else v.float() for k, v in values.items()}
        bs = {k: baselines[k] if k in tokens else baselines[k].to(xs[k].dtype) for k in values}
        if tokens:
            with torch.no_grad():
                xs.update({k: v for k, v in embed({k: values[k] for k in tokens}).items() if k in tokens})
                bs.update({k: v for k, v in embed({k: baselines[k] for k in tokens}).items() if k in tokens})
        return ({k: x.detach().contiguous() for k, x in xs.items()},
                {k: b.detach().expand_as(xs[k]).contiguous() for k, b in bs.items()})

    def _forward(self, part: FeatureBatch, embed: Any, precision: str):
        """The model from a chunk's points (the path's values) and its rows of the other slots, in
        ``precision``."""
        model = self.model
        device = model_device(model)
        continuous = set(part.keys) - part.token_keys() if embed is not None else set()

        def forward(points: dict[str, torch.Tensor], others: dict[str, tuple]) -> torch.Tensor:
            with model_precision(precision, device):
                values = dict(points)
                if continuous:
                    values.update({k: v for k, v in embed({k: points[k] for k in continuous}).items()
                                   if k in continuous})
                return self._logits(part.call(values, others), embed is not None)
        return forward

    def _logits(self, call: dict[str, tuple], embedded: bool) -> torch.Tensor:
        """The model's logits for one chunk's call (``forward_from_embedding`` when ``embedded``): the
        one place a subclass changes how the model runs (IG-GIM: under GIM's rules)."""
        model = self.model
        return logits_of(model.forward_from_embedding(**call) if embedded else model.forward(**call))

    def _padding_difference(self, features: FeatureBatch, baselines: dict[str, torch.Tensor], embed: Any,
                            groups: list[Group], *, at_baseline: bool) -> float:
        """The padding check at one end of the path: the padded batch's logits at the input (the
        model's own check) or at the baseline (IG's: a baseline that fills padded positions, such as
        the UNK token, makes them data for a model that infers its mask from the embeddings) against
        those of the trimmed groups (worst relative difference, float32: the check is about what the
        model computes, not about rounding)."""
        def logits(part: FeatureBatch, cut: dict[str, torch.Tensor]) -> torch.Tensor:
            xs, bs = self._endpoints(part, cut, embed)
            return self._forward(part, embed, "fp32")(bs if at_baseline else xs, part.others()).float()
        worst = 0.0
        with torch.no_grad():
            full = logits(features, baselines)
            for index, sizes in groups:
                part = features.subset(index, sizes)
                cut = {k: features.cut(k, b, index, sizes) for k, b in baselines.items()}
                worst = max(worst, relative_difference(full[index.to(full.device)], logits(part, cut)))
        return worst

    def _baselines(self, baseline: dict[str, Any] | None, features: FeatureBatch) -> dict[str, torch.Tensor]:
        """Baselines in raw input space, expanded to each value's shape."""
        values = features.values()
        tokens = features.token_keys() if self.use_embeddings else set()
        if baseline is None:
            return {k: torch.ones_like(v) if k in tokens else torch.zeros_like(v) + 1e-2 for k, v in values.items()}
        if not isinstance(baseline, dict):
            raise TypeError("baseline must be a dict from feature key to tensor or None; got "
                            f"{type(baseline).__name__}")
        out = {}
        for k, v in values.items():
            if k not in baseline:
                raise ValueError(f"baseline has no entry for feature {k!r}; expected keys {sorted(values)}")
            b = check_baseline(k, baseline[k], v)
            if k in tokens and b.is_floating_point():
                raise TypeError(f"baseline[{k!r}] holds token ids for an embedded feature and must be an "
                                f"integer tensor; got {b.dtype}")
            out[k] = b.expand_as(v)
        return out

