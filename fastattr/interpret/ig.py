"""Drop-in replacement for ``pyhealth.interpret.methods.IntegratedGradients``."""
from __future__ import annotations

import warnings
from typing import Any

import torch

from fastattr.core.backend import check_backend_name
from fastattr.core.integrated import check_baseline, check_finite, resolve_options, run_integrated_gradients
from fastattr.core.packing import GROUP_COST, plan_groups
from fastattr.core.quadrature import quadrature
from fastattr.core.targets import resolve_targets
from fastattr.interpret.features import FeatureBatch, model_device, require_feature_protocol, require_methods

# Logits of a trimmed group may differ from the padded batch's by float rounding only (other
# shapes, other summation order); a model whose output depends on padding differs far more.
PACK_RTOL = 1e-4


def _check_pack(pack_lengths: Any) -> None:
    if not (pack_lengths is True or pack_lengths is False or
            (isinstance(pack_lengths, str) and pack_lengths == "auto")):
        raise ValueError(f"pack_lengths must be 'auto', True or False; got {pack_lengths!r}")


class IntegratedGradients:
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
        steps: default number of path subintervals.
        backend: default backend, ``"auto" | "torch" | "triton"``; ``None`` reads ``FASTATTR_BACKEND``.
        pack_lengths: ``"auto"`` (default): run samples in length groups once a check shows the
            model's logits ignore padding (checked once per model and feature layout; a model
            that fails runs padded, with a warning); ``True``: the same, but a failed check is an
            error; ``False``: always run the padded batch.
    """

    def __init__(self, model: torch.nn.Module, use_embeddings: bool = True, steps: int = 50, *,
                 backend: str | None = None, pack_lengths: bool | str = "auto") -> None:
        purpose = "IntegratedGradients"
        require_feature_protocol(model, purpose)
        require_methods(model, ("forward",), purpose)
        if use_embeddings:
            require_methods(model, ("forward_from_embedding", "get_embedding_model"),
                            f"{purpose} with use_embeddings=True")
        quadrature("uniform", steps)
        check_backend_name(backend)
        _check_pack(pack_lengths)
        self.model = model
        self.use_embeddings = use_embeddings
        self.steps = steps
        self.backend = backend
        self.pack_lengths = pack_lengths
        #: rows per forward the last ``attribute`` call settled on (the largest over its groups)
        self.last_internal_batch_size: int | None = None
        #: length groups of the last call: ``[(samples, padded sizes), ...]``
        self.last_groups: list[tuple[int, list[int]]] = []
        #: ``(probabilities [B, C], targets [B])`` of the last call's forward, for the cohort runner
        self.last_predictions: tuple[torch.Tensor, torch.Tensor] | None = None
        # verdicts of the padding check per feature layout (see _packing_allowed)
        self._verdicts: dict[tuple, tuple[bool, float]] = {}
        model.eval()

    def __call__(self, **batch: Any) -> dict[str, torch.Tensor]:
        return self.attribute(**batch)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={type(self.model).__name__})"

    def attribute(
        self,
        baseline: dict[str, torch.Tensor] | None = None,
        steps: int | None = None,
        target_class_idx: int | torch.Tensor | None = None,
        *,
        internal_batch_size: int | None = None,
        method: str = "uniform",
        return_convergence_delta: bool = False,
        backend: str | None = None,
        progress: bool | None = None,
        pack_lengths: bool | str | None = None,
        **batch: Any,
    ) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Attributions per feature key, each of the raw input value's shape.

        Args:
            baseline: per feature key, a baseline in raw input space (token ids for token
                features); ``None`` gives PyHealth's defaults.
            steps: path subintervals (default: the constructor's ``steps``).
            target_class_idx: class to explain, an int or one class per sample (tensor, array,
                list); ``None`` takes the argmax of the model's logits. Ignored for a single logit.
            internal_batch_size: rows (sample x path point) per forward; results do not depend on it.
                Default: on CUDA all rows of a length group (halved on out-of-memory); on the CPU
                sized from the activation bytes of a one-point probe.
            method: quadrature rule; ``"uniform"`` is PyHealth's (steps + 1 equal-weight points).
            return_convergence_delta: also return, per sample, ``sum(attributions) - (f(x) - f(b))``.
            backend: ``"auto" | "torch" | "triton"`` for this call.
            progress: progress bar over the path (``None``: only on a terminal).
            pack_lengths: ``"auto" | True | False`` for this call (default: the constructor's).
            **batch: a dataloader batch; entries that are not feature keys are ignored.
        """
        model = self.model
        device = model_device(model)
        pack = self.pack_lengths if pack_lengths is None else pack_lengths
        _check_pack(pack)
        options = resolve_options(steps=self.steps if steps is None else steps, method=method,
                                  internal_batch_size=internal_batch_size,
                                  backend=backend if backend is not None else self.backend, device=device,
                                  return_convergence_delta=return_convergence_delta, progress=progress)
        features = FeatureBatch.from_batch(model, batch, device=device)
        for key, value in features.values().items():
            check_finite(f"batch[{key!r}]", value)
        baselines = self._baselines(baseline, features)

        with torch.no_grad():
            out = model.forward(**features.call())
        logits = out["logit"]
        logits = logits.unsqueeze(1) if logits.dim() == 1 else logits
        targets = resolve_targets(target_class_idx, logits, features.size, logits.shape[1], device)
        prob = out.get("y_prob", logits) if isinstance(out, dict) else logits
        self.last_predictions = (prob.detach().float().reshape(features.size, -1), targets)

        embed = None
        if self.use_embeddings:
            embed = model.get_embedding_model()
            if embed is None:
                raise TypeError("IntegratedGradients with use_embeddings=True needs model.get_embedding_model() "
                                "to return the embedding module; it returned None")
        groups = self._groups(features, baselines, embed, pack, device, len(options.alphas))
        self.last_groups = [(len(index), sizes) for index, sizes in groups]
        parts, deltas, rows = [], [], []
        for index, sizes in groups:
            part = features if sizes is None else features.subset(index, sizes)
            part_baselines = baselines if sizes is None else \
                {k: features.cut(k, b, index, sizes) for k, b in baselines.items()}
            result = run_integrated_gradients(self._forward(part, embed), *self._endpoints(part, part_baselines, embed),
                                              options, targets=targets if sizes is None else targets[index.to(device)],
                                              extra=part.others(),
                                              sum_last_dim=self._summed(part, embed))
            parts.append((index, part.expand(result.attributions)))
            deltas.append((index, result.delta))
            rows.append(result.chunk_rows)
        self.last_internal_batch_size = max(rows)
        attributions = parts[0][1] if groups[0][1] is None else features.place(parts)
        if not return_convergence_delta:
            return attributions
        if groups[0][1] is None:
            return attributions, deltas[0][1]
        delta = deltas[0][1].new_empty(features.size)
        for index, d in deltas:
            delta[index.to(delta.device)] = d
        return attributions, delta

    # -- pieces ------------------------------------------------------------------------------
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

    def _forward(self, part: FeatureBatch, embed: Any):
        """The model from a chunk's points (the path's values) and its rows of the other slots."""
        model = self.model
        continuous = set(part.keys) - part.token_keys() if embed is not None else set()

        def forward(points: dict[str, torch.Tensor], others: dict[str, tuple]) -> torch.Tensor:
            values = dict(points)
            if continuous:
                values.update({k: v for k, v in embed({k: points[k] for k in continuous}).items() if k in continuous})
            call = part.call(values, others)
            return (model.forward_from_embedding(**call) if embed is not None else model.forward(**call))["logit"]
        return forward

    def _groups(self, features: FeatureBatch, baselines: dict[str, torch.Tensor], embed: Any, pack: Any,
                device: torch.device, points: int) -> list[tuple[torch.Tensor, list[int] | None]]:
        """``[(sample index, padded sizes or None for the batch as it is), ...]``."""
        whole = [(torch.arange(features.size), None)]
        if pack is False:
            return whole
        lengths = features.lengths()
        padded = features.padded_sizes()
        groups = plan_groups(lengths, features.padded_spans(), points,
                             GROUP_COST.get(device.type, GROUP_COST["cuda"]))
        if len(groups) == 1 and groups[0][1] == padded:
            return whole  # nothing to trim
        if not self._packing_allowed(features, baselines, embed, groups, pack):
            return whole
        return groups

    def _packing_allowed(self, features: FeatureBatch, baselines: dict[str, torch.Tensor], embed: Any,
                         groups: list[tuple[torch.Tensor, list[int]]], pack: Any) -> bool:
        """Whether the model's logits ignore padding for this feature layout: the padded batch's
        logits at the input and at the baseline against those of the trimmed groups. Checked once
        per layout; a failure warns once (``pack_lengths="auto"``) or raises (``True``)."""
        key = tuple((k, features.layouts[k].schema, features.layouts[k].token, features.value(k).dim(),
                     features.value(k).dtype) for k in features.keys) + (embed is not None,)
        if key not in self._verdicts:
            worst = 0.0
            with torch.no_grad():
                full = self._endpoint_logits(features, baselines, embed)
                for index, sizes in groups:
                    part = features.subset(index, sizes)
                    cut = {k: features.cut(k, b, index, sizes) for k, b in baselines.items()}
                    for whole, trimmed in zip(full, self._endpoint_logits(part, cut, embed)):
                        ref = whole[index.to(whole.device)]
                        scale = ref.abs().amax().clamp_min(1.0)
                        worst = max(worst, float((ref - trimmed).abs().amax() / scale))
            ok = worst <= PACK_RTOL
            self._verdicts[key] = (ok, worst)
            if not ok and pack == "auto":
                warnings.warn(f"pack_lengths='auto': {type(self.model).__name__}'s logits change when padding is "
                              f"trimmed (relative difference {worst:.2e} > {PACK_RTOL:g}), so its output depends on "
                              "padding; this model runs on the padded batch, as in PyHealth", stacklevel=4)
        ok, worst = self._verdicts[key]
        if not ok and pack is True:
            raise ValueError(f"pack_lengths=True, but {type(self.model).__name__}'s logits change when padding is "
                             f"trimmed (relative difference {worst:.2e} > {PACK_RTOL:g}): trimming would change its "
                             "attributions. Use pack_lengths='auto' or False for this model")
        return ok

    def _endpoint_logits(self, part: FeatureBatch, baselines: dict[str, torch.Tensor], embed: Any):
        xs, bs = self._endpoints(part, baselines, embed)
        forward = self._forward(part, embed)
        others = part.others()
        return [forward(xs, others).float(), forward(bs, others).float()]

    def _baselines(self, baseline: dict[str, Any] | None, features: FeatureBatch) -> dict[str, torch.Tensor]:
        """Baselines in raw input space, expanded to each value's shape."""
        values = features.values()
        tokens = features.token_keys() if self.use_embeddings else set()
        if baseline is None:
            return {k: torch.ones_like(v) if k in tokens else torch.zeros_like(v) + 1e-2 for k, v in values.items()}
        if not isinstance(baseline, dict):
            raise TypeError(f"baseline must be a dict from feature key to tensor or None; got {type(baseline).__name__}")
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

