"""Model-agnostic integrated gradients with the path steps batched into few forwards."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from fastattr.core.backend import resolve_backend
from fastattr.core.checks import check_auto_options, check_count
from fastattr.core.chunks import ChunkSizer, RowBytes
from fastattr.core.quadrature import AutoSteps, is_equal_weight, quadrature
from fastattr.core.targets import resolve_targets
from fastattr.kernels import interpolate as ops

Forward = Callable[[dict[str, Any]], torch.Tensor]
# The core's forward: the chunk's interpolated points and the chunk's rows of the additional inputs.
RowsForward = Callable[[dict[str, torch.Tensor], dict[str, Any]], torch.Tensor]

def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise ``ValueError`` when a floating tensor holds NaN or Inf."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


def check_internal_batch_size(internal_batch_size: int | None) -> None:
    """Raise ``ValueError`` unless ``internal_batch_size`` is ``None`` or an integer >= 1."""
    check_count("internal_batch_size", internal_batch_size, optional=True)


def _logits_2d(logits: Any) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"forward must return a logits tensor; got {type(logits).__name__}")
    if logits.dim() == 1:
        return logits.unsqueeze(1)
    if logits.dim() != 2:
        raise ValueError(f"forward must return logits of shape [batch, classes]; got {tuple(logits.shape)}")
    return logits


def _validate_batch(inputs: Mapping[str, torch.Tensor]) -> int:
    if not inputs:
        raise ValueError("inputs is empty: give at least one tensor to attribute")
    sizes = set()
    for key, x in inputs.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"inputs[{key!r}] must be a tensor; got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"inputs[{key!r}] must be a floating tensor to interpolate; got {x.dtype}")
        if x.dim() == 0:
            raise ValueError(f"inputs[{key!r}] must have a batch dimension; got a scalar")
        check_finite(f"inputs[{key!r}]", x)
        sizes.add(x.shape[0])
    if len(sizes) != 1:
        raise ValueError(f"inputs disagree on the batch size: {sorted(sizes)}")
    batch = sizes.pop()
    if batch == 0:
        raise ValueError("the batch is empty (batch size 0)")
    return batch


def broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``target`` (without growing it)."""
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


def check_baseline(key: str, baseline: Any, value: torch.Tensor) -> torch.Tensor:
    """``baseline`` as a finite tensor on ``value``'s device whose shape broadcasts to ``value``'s."""
    b = torch.as_tensor(baseline).to(value.device)
    if not broadcasts_to(b.shape, value.shape):
        raise ValueError(f"baseline[{key!r}] of shape {tuple(b.shape)} does not broadcast to the input shape "
                         f"{tuple(value.shape)}")
    check_finite(f"baseline[{key!r}]", b)
    return b


def _expand_baselines(inputs: Mapping[str, torch.Tensor],
                      baselines: Mapping[str, Any] | None) -> dict[str, torch.Tensor]:
    out = {}
    for key, x in inputs.items():
        if baselines is None:
            b = torch.zeros_like(x)
        elif key not in baselines:
            raise ValueError(f"baseline has no entry for {key!r}; expected keys {sorted(inputs)}")
        else:
            b = check_baseline(key, baselines[key], x).to(x.dtype).expand_as(x)
        out[key] = b.contiguous()
    return out


@dataclass(frozen=True)
class IGOptions:
    """Integrated-gradients options, validated once by :func:`resolve_options`; the core trusts them."""

    alphas: torch.Tensor
    weights: torch.Tensor
    backend: str  # "torch" or "triton", resolved for the device
    internal_batch_size: int | None
    return_convergence_delta: bool
    progress: bool | None
    #: ``steps="auto"`` (:mod:`fastattr.core.adaptive`; ``alphas`` and ``weights`` are then empty)
    auto: AutoSteps | None = None


def resolve_options(*, steps: int | str, method: str | None, internal_batch_size: int | None, backend: str | None,
                    device: torch.device, return_convergence_delta: bool = False,
                    progress: bool | None = None, tolerance: float | None = None) -> IGOptions:
    """Validate and resolve the options of one integrated-gradients call: a fixed rule (``method``,
    default ``"uniform"``, with ``steps``) or ``steps="auto"`` with an optional ``tolerance``."""
    check_auto_options(steps, tolerance, method)
    auto = None
    if steps == "auto":
        auto = AutoSteps() if tolerance is None else AutoSteps(tolerance=float(tolerance))
        alphas = weights = torch.zeros(0, dtype=torch.float64)
    else:
        alphas, weights = quadrature(method or "uniform", steps)
    check_internal_batch_size(internal_batch_size)
    return IGOptions(alphas, weights, resolve_backend(backend, device), internal_batch_size,
                     bool(return_convergence_delta), progress, auto)


@dataclass
class IGResult:
    """What the core returns: attributions per key, the convergence delta when asked, the rows per
    forward settled on, the targets explained, and for ``steps="auto"`` each sample's points and
    estimated error."""

    attributions: dict[str, torch.Tensor]
    delta: torch.Tensor | None
    chunk_rows: int
    targets: torch.Tensor
    #: path points each sample took (``steps="auto"``; ``None`` for a fixed rule: the rule's count)
    points: torch.Tensor | None = None
    #: each sample's estimated relative error (``steps="auto"``)
    error: torch.Tensor | None = None


def _float_logits(logits: torch.Tensor) -> torch.Tensor:
    return logits.detach().to(torch.promote_types(logits.dtype, torch.float32))


def _rows_of(value: Any, sample: torch.Tensor, batch: int) -> Any:
    """The given rows of a batch-first tensor (inside tuples, lists and dicts too); anything else unchanged."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, sample) if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_rows_of(v, sample, batch) for v in value)
    if isinstance(value, Mapping):
        return {k: _rows_of(v, sample, batch) for k, v in value.items()}
    return value


class Kernels:
    """The path kernels of one backend: the fixed rule's interpolate / accumulate / finalize, and
    the listed rows' interpolate_rows / density (:mod:`fastattr.core.adaptive`)."""

    def __init__(self, backend: str) -> None:
        triton = backend == "triton"
        self.backend = backend
        self.interpolate = ops.interpolate_triton if triton else ops.interpolate_torch
        self.accumulate = ops.accumulate_triton if triton else ops.accumulate_torch
        self.finalize = ops.finalize_triton if triton else ops.finalize_torch
        self.interpolate_rows = ops.interpolate_rows_triton if triton else ops.interpolate_rows_torch
        self.density = ops.density_triton if triton else ops.density_torch


def kernels_for(options: IGOptions, xs: Mapping[str, torch.Tensor]) -> Kernels:
    """The options' backend, or torch where an input is not float32 (the kernels compute in
    float32; float64 inputs keep their precision)."""
    wide = any(torch.promote_types(x.dtype, torch.float32) != torch.float32 for x in xs.values())
    return Kernels("torch" if wide else options.backend)


class GridPath:
    """The fixed rule's rows: row ``r`` is sample ``r % B`` at path point ``r // B``; gradients
    are reduced with the rule's weights into one accumulator per key."""

    def __init__(self, xs: Mapping[str, torch.Tensor], options: IGOptions, kernels: Kernels) -> None:
        first = next(iter(xs.values()))
        self.batch, self.points, self.kernels = first.shape[0], len(options.alphas), kernels
        self.total = self.batch * self.points
        self.alphas, self.weights = options.alphas, options.weights
        self.acc_weights = torch.ones_like(self.weights) if is_equal_weight(self.weights) else self.weights
        self.accs = {k: torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
                     for k, x in xs.items()}

    def samples(self, start: int, rows: int, device: torch.device) -> torch.Tensor:
        return torch.arange(start, start + rows, device=device) % self.batch

    def interpolate(self, key: str, x: torch.Tensor, b: torch.Tensor, start: int, rows: int) -> torch.Tensor:
        return self.kernels.interpolate(x, b, self.alphas, start, rows)

    def reduce(self, key: str, grad: torch.Tensor, start: int) -> None:
        self.kernels.accumulate(self.accs[key], grad, self.acc_weights, start)

    def record(self, logits: torch.Tensor, start: int) -> None:
        """The rows' target logits: not needed by a fixed rule."""

    def attributions(self, xs: Mapping[str, torch.Tensor], bs: Mapping[str, torch.Tensor],
                     summed: set[str]) -> dict[str, torch.Tensor]:
        divisor = float(self.points) if is_equal_weight(self.weights) else 1.0
        return {k: self.kernels.finalize(xs[k], bs[k], self.accs[k], divisor, k in summed).to(xs[k].dtype)
                for k in xs}


class ChunkRunner:
    """Runs a path's rows in chunks: each chunk is one forward and one input-only backward whose
    gradients the path reduces (:class:`GridPath`: weighted sums; the adaptive rule's listed
    rows: one attribution density per row).

    The logits at the inputs (for the convergence delta) ride along as extra rows of the first
    chunk's forward; no gradient flows from them.
    """

    def __init__(self, forward: RowsForward, xs: dict[str, torch.Tensor], bs: dict[str, torch.Tensor],
                 extra: Mapping[str, Any], options: IGOptions, need_fx: bool, path: Any,
                 per_row: RowBytes | None = None) -> None:
        self.forward, self.xs, self.bs, self.extra, self.options = forward, xs, bs, extra, options
        self.keys = list(xs)
        first = xs[self.keys[0]]
        self.batch, self.device, self.path = first.shape[0], first.device, path
        self.need_fx = need_fx
        self.fx: torch.Tensor | None = None
        points = -(-path.total // self.batch)
        self.sizer = ChunkSizer(options.internal_batch_size, self.batch, points, self.device,
                                row_elements=sum(x[0].numel() for x in xs.values()), per_row=per_row)

    def _chunk(self, start: int, rows: int, endpoint_rows: int, targets: torch.Tensor) -> tuple:
        batch, device = self.batch, self.device
        sample = self.path.samples(start, rows, device)
        if endpoint_rows:
            sample = torch.cat([sample, torch.arange(batch, device=device)])
        with torch.enable_grad():
            path = {k: self.path.interpolate(k, self.xs[k], self.bs[k], start, rows).requires_grad_(True)
                    for k in self.keys}
            points = {k: torch.cat([path[k], self.xs[k]]) if endpoint_rows else path[k] for k in self.keys}
            with self.sizer.watch():
                logits = _logits_2d(self.forward(points, _rows_of(self.extra, sample, batch)))
            if logits.shape[0] != rows + endpoint_rows:
                raise ValueError(f"forward returned {logits.shape[0]} rows for {rows + endpoint_rows} inputs")
            if endpoint_rows:
                self.fx = _float_logits(logits[rows:])
            picked = logits[:rows].gather(1, targets.index_select(0, sample[:rows]).unsqueeze(1)).squeeze(1)
            # The path tensor is a leaf, so autograd.grad hands back exactly the [rows, ...]
            # gradients the reduction kernel consumes.
            grads = torch.autograd.grad(picked.sum(), [path[k] for k in self.keys], allow_unused=True)
        self.path.record(picked.detach(), start)
        return grads

    def run(self, targets: torch.Tensor) -> None:
        """Every path row, for the target logit of each row's sample (``targets``: one class per sample)."""
        total = self.path.total
        progress = self.options.progress
        bar = tqdm(total=total, desc="integrated gradients", unit="row", leave=False,
                   disable=None if progress is None else not progress)
        start = 0
        while start < total:
            rows = min(self.sizer.rows, total - start)
            extra = self.batch if self.need_fx and self.fx is None else 0
            try:
                grads = self._chunk(start, rows, extra, targets)
            except torch.cuda.OutOfMemoryError:
                if not self.sizer.shrink(rows):
                    raise
                torch.cuda.empty_cache()
                continue
            for k, g in zip(self.keys, grads, strict=False):
                if g is not None:  # an unused input: nothing to add (its rows stay zero)
                    self.path.reduce(k, g, start)
            del grads
            self.sizer.end(rows + extra)
            start += rows
            bar.update(rows)
        bar.close()


def run_integrated_gradients(forward: RowsForward, xs: dict[str, torch.Tensor], bs: dict[str, torch.Tensor],
                             options: IGOptions, *, targets: torch.Tensor, extra: Mapping[str, Any] | None = None,
                             sum_last_dim: Iterable[str] = (), fx: torch.Tensor | None = None) -> IGResult:
    """The core (the one entry point of a fixed rule), on validated inputs: ``xs`` floating, batch
    first, contiguous; ``bs`` expanded to them; ``targets`` one class per sample (resolved by the
    caller); ``extra`` batch-first tensors (in any nesting) gathered per row; ``fx`` the logits at
    the inputs where the caller has them (for the convergence delta; else they ride along as extra
    rows of the first chunk)."""
    summed = set(sum_last_dim)
    path = GridPath(xs, options, kernels_for(options, xs))
    runner = ChunkRunner(forward, xs, bs, extra or {}, options, options.return_convergence_delta and fx is None, path)
    runner.run(targets)
    attributions = path.attributions(xs, bs, summed)
    delta = convergence_delta(forward, bs, extra, runner.fx if fx is None else fx, targets, attributions) \
        if options.return_convergence_delta else None
    return IGResult(attributions, delta, runner.sizer.rows, targets)


def convergence_delta(forward: RowsForward, bs: dict[str, torch.Tensor], extra: Mapping[str, Any] | None,
                      fx: torch.Tensor, targets: torch.Tensor,
                      attributions: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per sample, ``sum(attributions) - (f(x) - f(b))`` for the target logit (``fx``: the
    logits at the inputs)."""
    batch = fx.shape[0]
    with torch.no_grad():
        fb = _float_logits(_logits_2d(forward(bs, dict(extra or {}))))
    if fb.shape[0] != batch:
        raise ValueError(f"forward returned {fb.shape[0]} rows for a batch of {batch}")
    idx = targets.unsqueeze(1)
    gap = fx.gather(1, idx).squeeze(1) - fb.gather(1, idx).squeeze(1)
    total_attr = sum(a.reshape(batch, -1).sum(dim=1).to(gap.dtype) for a in attributions.values())
    return total_attr - gap


def integrated_gradients(
    forward: Forward,
    inputs: Mapping[str, torch.Tensor],
    baselines: Mapping[str, Any] | None = None,
    target: int | torch.Tensor | None = None,
    *,
    steps: int = 50,
    method: str = "uniform",
    internal_batch_size: int | None = None,
    additional_inputs: Mapping[str, Any] | None = None,
    sum_last_dim: Iterable[str] = (),
    return_convergence_delta: bool = False,
    backend: str | None = None,
    progress: bool | None = None,
) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Integrated gradients of ``forward`` with respect to every tensor in ``inputs``.

    Args:
        forward: maps a dict (the interpolated ``inputs`` plus ``additional_inputs``, all holding
            the chunk's rows) to logits ``[rows, classes]``. Rows must not interact (eval mode).
        inputs: floating tensors, batch first, one batch size.
        baselines: per key, a tensor broadcasting to the input's shape; zeros when ``None``.
        target: class to explain, an int or a LongTensor with one class per sample; ``None`` takes
            the argmax of ``forward(inputs)``. A single logit column always targets 0.
        steps: subintervals of the quadrature rule ``method`` (see ``fastattr.core.quadrature``).
        internal_batch_size: rows (sample x path point) per forward; results do not depend on it.
            Default: :class:`ChunkSizer` (on CUDA all rows, halved on out-of-memory; on the CPU
            sized from the activation bytes of a one-point probe).
        additional_inputs: tensors passed to ``forward`` alongside the inputs without being
            attributed (masks, times). Tensors whose first dim is the batch size are gathered per
            row; anything else is passed unchanged.
        sum_last_dim: keys whose attribution is summed over the last (embedding) dimension.
        return_convergence_delta: also return, per sample, ``sum(attributions) - (f(x) - f(b))``
            for the target logit.
        backend: ``"auto" | "torch" | "triton"``; ``None`` reads ``FASTATTR_BACKEND``.
        progress: show a progress bar over chunks (``None``: only on a terminal).

    Returns:
        ``{key: attribution}`` (input shape, or without the last dim for ``sum_last_dim`` keys),
        and the convergence delta ``[batch]`` when asked. Only input gradients are taken: no
        parameter's ``.grad`` is touched.
    """
    _validate_batch(inputs)
    keys = list(inputs)
    unknown = set(sum_last_dim) - set(keys)
    if unknown:
        raise ValueError(f"sum_last_dim names keys that are not inputs: {sorted(unknown)}")
    extra = dict(additional_inputs or {})
    clash = set(extra) & set(keys)
    if clash:
        raise ValueError(f"additional_inputs reuse input keys: {sorted(clash)}")
    xs = {k: inputs[k].detach().contiguous() for k in keys}
    if isinstance(steps, str) and steps == "auto":
        raise ValueError("steps='auto' is available through fastattr.IntegratedGradients(model).attribute(...); "
                         "integrated_gradients takes an integer number of steps")
    options = resolve_options(steps=steps, method=method, internal_batch_size=internal_batch_size, backend=backend,
                              device=xs[keys[0]].device, return_convergence_delta=return_convergence_delta,
                              progress=progress)
    rows_forward: RowsForward = lambda points, rows: forward({**points, **rows})  # noqa: E731
    with torch.no_grad():  # the class explained (and f(x) for the delta) from one forward at the inputs
        fx = _float_logits(_logits_2d(rows_forward(xs, extra)))
    if fx.shape[0] != xs[keys[0]].shape[0]:
        raise ValueError(f"forward returned {fx.shape[0]} rows for a batch of {xs[keys[0]].shape[0]}")
    targets = resolve_targets(target, fx, fx.shape[0], fx.shape[1], fx.device)
    result = run_integrated_gradients(rows_forward, xs, _expand_baselines(xs, baselines), options, targets=targets,
                                      extra=extra, sum_last_dim=sum_last_dim, fx=fx)
    if return_convergence_delta:
        return result.attributions, result.delta
    return result.attributions
