"""Drop-in replacement for ``pyhealth.interpret.methods.IntegratedGradients``."""
from __future__ import annotations

from typing import Any

import torch

from fastattr.core.backend import check_backend_name, resolve_backend
from fastattr.core.integrated import check_baseline, check_finite, check_internal_batch_size, integrated_gradients, resolve_targets
from fastattr.interpret.features import (
    expand_to_inputs,
    feature_tuples,
    model_device,
    require_feature_protocol,
    require_methods,
    value_index,
    with_masks,
)
from fastattr.core.quadrature import quadrature


class IntegratedGradients:
    """Integrated gradients for PyHealth-protocol models, all path steps batched.

    Same constructor, ``attribute`` signature and results (to float rounding) as PyHealth 2.1.0's
    ``IntegratedGradients``: masks appended when the schema has none, UNK-token (1) baselines for
    token features and 0.01 for continuous ones, token features interpolated in embedding space
    and summed over the embedding dim, continuous features embedded inside each step. The path
    points run as a few large forwards with input-only gradients instead of one forward and
    backward per step.

    Args:
        model: a model following the PyHealth protocol (``feature_keys``,
            ``dataset.input_processors``, ``forward``, ``forward_from_embedding``,
            ``get_embedding_model``). It is put in eval mode.
        use_embeddings: interpolate token features in embedding space (PyHealth's default).
        steps: default number of path subintervals.
        backend: default backend, ``"auto" | "torch" | "triton"``; ``None`` reads ``FASTATTR_BACKEND``.
    """

    def __init__(self, model: torch.nn.Module, use_embeddings: bool = True, steps: int = 50, *,
                 backend: str | None = None) -> None:
        purpose = "IntegratedGradients"
        require_feature_protocol(model, purpose)
        require_methods(model, ("forward",), purpose)
        if use_embeddings:
            require_methods(model, ("forward_from_embedding", "get_embedding_model"),
                            f"{purpose} with use_embeddings=True")
        quadrature("uniform", steps)
        check_backend_name(backend)
        self.model = model
        self.use_embeddings = use_embeddings
        self.steps = steps
        self.backend = backend
        #: rows per forward the last ``attribute`` call settled on (diagnostics, benchmarks)
        self.last_internal_batch_size: int | None = None
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
        **batch: Any,
    ) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Attributions per feature key, each of the raw input value's shape.

        Args:
            baseline: per feature key, a baseline in raw input space (token ids for token
                features); ``None`` gives PyHealth's defaults.
            steps: path subintervals (default: the constructor's ``steps``).
            target_class_idx: class to explain, an int or a LongTensor with one class per sample;
                ``None`` takes the argmax of the model's logits. Ignored for a single logit.
            internal_batch_size: rows (sample x path point) per forward; results do not depend on it.
                Default: sized from a one-point probe (free memory on CUDA, activation bytes on the CPU).
            method: quadrature rule; ``"uniform"`` is PyHealth's (steps + 1 equal-weight points).
            return_convergence_delta: also return, per sample, ``sum(attributions) - (f(x) - f(b))``.
            backend: ``"auto" | "torch" | "triton"`` for this call.
            progress: progress bar over the path (``None``: only on a terminal).
            **batch: a dataloader batch; entries that are not feature keys are ignored.
        """
        model = self.model
        steps = self.steps if steps is None else steps
        quadrature(method, steps)
        check_internal_batch_size(internal_batch_size)
        device = model_device(model)
        resolve_backend(backend if backend is not None else self.backend, device)
        features = feature_tuples(model, batch)
        features = {k: tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in f)
                    for k, f in features.items()}
        features = with_masks(model, features)
        slots = {k: value_index(model, k) for k in features}
        values = {k: features[k][slots[k]] for k in features}
        shapes = {k: v.shape for k, v in values.items()}
        sizes = {v.shape[0] if v.dim() else 0 for v in values.values()}
        if 0 in sizes:
            raise ValueError("the batch is empty (batch size 0)")
        if len(sizes) != 1:
            raise ValueError(f"feature values disagree on the batch size: {sorted(sizes)}")
        batch_size = sizes.pop()
        for k, v in values.items():
            check_finite(f"batch[{k!r}]", v)
        token = {k for k in features if model.dataset.input_processors[k].is_token()}
        baselines = self._baselines(baseline, values, token)

        with torch.no_grad():
            logits = model.forward(**features)["logit"]
        if logits.dim() == 1:
            logits = logits.unsqueeze(1)
        targets = resolve_targets(target_class_idx, logits, batch_size, logits.shape[1], device)

        embed = model.get_embedding_model() if self.use_embeddings else None
        if self.use_embeddings and embed is None:
            raise TypeError("IntegratedGradients with use_embeddings=True needs model.get_embedding_model() "
                            "to return the embedding module; it returned None")
        embedded_tokens = token if self.use_embeddings else set()
        if embedded_tokens:
            with torch.no_grad():
                values.update({k: v for k, v in embed({k: values[k] for k in embedded_tokens}).items()
                               if k in embedded_tokens})
                baselines.update({k: v for k, v in embed({k: baselines[k] for k in embedded_tokens}).items()
                                  if k in embedded_tokens})
        continuous = set(features) - token if self.use_embeddings else set()

        stats: dict[str, Any] = {}
        extra = {f"{k}\0{i}": t for k, f in features.items() for i, t in enumerate(f) if i != slots[k]}

        def forward(rows: dict[str, Any]) -> torch.Tensor:
            points = {k: rows[k] for k in features}
            if continuous:
                points.update({k: v for k, v in embed({k: points[k] for k in continuous}).items()
                               if k in continuous})
            call = {}
            for k, f in features.items():
                call[k] = tuple(points[k] if i == slots[k] else rows[f"{k}\0{i}"] for i in range(len(f)))
            if self.use_embeddings:
                return model.forward_from_embedding(**call)["logit"]
            return model.forward(**call)["logit"]

        result = integrated_gradients(
            forward,
            {k: values[k].float() if not values[k].is_floating_point() else values[k] for k in features},
            baselines,
            targets,
            steps=steps,
            method=method,
            internal_batch_size=internal_batch_size,
            additional_inputs=extra,
            sum_last_dim={k for k in embedded_tokens if values[k].dim() >= 3},
            return_convergence_delta=return_convergence_delta,
            backend=backend if backend is not None else self.backend,
            progress=progress,
            stats=stats,
        )
        self.last_internal_batch_size = stats["chunk_rows"]
        if return_convergence_delta:
            attributions, delta = result
            return expand_to_inputs(attributions, shapes), delta
        return expand_to_inputs(result, shapes)

    def _baselines(self, baseline: dict[str, Any] | None, values: dict[str, torch.Tensor],
                   token: set[str]) -> dict[str, torch.Tensor]:
        if baseline is None:
            return {k: torch.ones_like(v) if (self.use_embeddings and k in token) else torch.zeros_like(v) + 1e-2
                    for k, v in values.items()}
        if not isinstance(baseline, dict):
            raise TypeError(f"baseline must be a dict from feature key to tensor or None; got {type(baseline).__name__}")
        out = {}
        for k, v in values.items():
            if k not in baseline:
                raise ValueError(f"baseline has no entry for feature {k!r}; expected keys {sorted(values)}")
            b = check_baseline(k, baseline[k], v)
            if self.use_embeddings and k in token:
                if b.is_floating_point():
                    raise TypeError(f"baseline[{k!r}] holds token ids for an embedded feature and must be an "
                                    f"integer tensor; got {b.dtype}")
                b = b.expand_as(v)
            out[k] = b
        return out
