"""Model-agnostic integrated gradients with the path steps batched into few forwards."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from fastattr.kernels import interpolate as ops
from tqdm.auto import tqdm

from fastattr.core.backend import resolve_backend
from fastattr.core.checks import check_count
from fastattr.core.quadrature import is_equal_weight, quadrature
from fastattr.core.targets import resolve_targets

Forward = Callable[[dict[str, Any]], torch.Tensor]
# The core's forward: the chunk's interpolated points and the chunk's rows of the additional inputs.
RowsForward = Callable[[dict[str, torch.Tensor], dict[str, Any]], torch.Tensor]

# Most path points per forward on the CPU; larger chunks measured no faster.
CPU_MAX_POINTS = 16
# Bytes of saved activations one CPU chunk may hold. Measured on the 2-core reference CPU with
# PyHealth's 2-layer Transformer: the fastest chunks held ~50-80 MiB of activations for 40, 128
# and 256 codes alike (16, 4 and 2 path points of the batch). The chunk sweep in
# benchmarks/RESULTS.md (lengths 8-512, batches 1-64, dims 32-256) keeps it: 32 MiB (the L3) was
# better only at 512 codes with dim 32 and up to 1.25x worse at short lengths with batch 8.
CPU_CHUNK_BYTES = 64 << 20
# A whole path whose interpolated inputs hold at most this many elements runs as one chunk on the
# CPU, without the probe: the probe's extra forward costs more there than any chunk size saves
# (the chunk sweep in benchmarks/RESULTS.md: 1.3x-1.5x slower with the probe at batch 1).
CPU_SMALL_PATH = 1 << 17


class ChunkSizer:
    """Rows (sample x path point) per forward.

    Fixed when the caller gives ``internal_batch_size``, and all rows at once on the CPU for a
    small path (``CPU_SMALL_PATH`` interpolated elements in all). On CUDA every row runs in one forward
    (small clinical models are launch-bound there: fewer, larger batches are faster), and a chunk
    that runs out of memory is retried in halves (:meth:`shrink`); the size that fit is kept for
    the rest. On the CPU one path point of the batch runs first as a probe that counts the bytes
    autograd saves for the backward (the activations, which scale with the rows; parameters
    excluded), and chunks are sized so their activations stay near ``CPU_CHUNK_BYTES``: large
    enough to batch well, small enough to stay in cache rather than stream through memory.
    Results do not depend on the sizes.
    """

    def __init__(self, requested: int | None, batch: int, points: int, device: torch.device,
                 row_elements: int = 0) -> None:
        self.batch = batch
        self.mode = "fixed" if requested is not None else ("cuda" if device.type == "cuda" else "cpu")
        if self.mode == "cpu" and batch * points * row_elements <= CPU_SMALL_PATH:
            self.mode, requested = "fixed", batch * points
        self.rows = requested if requested is not None else (batch * points if self.mode == "cuda" else batch)
        self.max_rows = batch * min(points, CPU_MAX_POINTS)
        self._saved: dict[int, int] = {}

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if not (tensor.is_leaf and tensor.requires_grad):  # parameters do not grow with the rows
            storage = tensor.untyped_storage()
            self._saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    def watch(self):
        """Context for the chunk's forward: records saved activations during the CPU probe."""
        if self.mode == "cpu":
            return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        return contextlib.nullcontext()

    def end(self, rows: int) -> None:
        """After a chunk of ``rows`` forward rows ran: settle the size on the CPU probe."""
        if self.mode == "cpu":
            per_row = max(sum(self._saved.values()), 1) / rows
            self.rows = min(self.max_rows, max(self.batch, int(CPU_CHUNK_BYTES / per_row) // self.batch * self.batch))
            self._saved.clear()
            self.mode = "fixed"

    def shrink(self, rows: int) -> bool:
        """A chunk of ``rows`` ran out of CUDA memory: halve (whole path points while they fit).
        False when the size was the caller's or is down to one row (the error then stands)."""
        if self.mode != "cuda" or rows <= 1:
            return False
        half = rows // 2
        self.rows = half // self.batch * self.batch if half >= self.batch else half
        return True


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


def check_baseline(key: str, baseline: Any, value: torch.Tensor) -> torch.Tensor:
    """``baseline`` as a finite tensor on ``value``'s device whose shape broadcasts to ``value``'s."""
    b = torch.as_tensor(baseline).to(value.device)
    try:
        ok = torch.broadcast_shapes(b.shape, value.shape) == value.shape
    except RuntimeError:
        ok = False
    if not ok:
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


def resolve_options(*, steps: int, method: str, internal_batch_size: int | None, backend: str | None,
                    device: torch.device, return_convergence_delta: bool = False,
                    progress: bool | None = None) -> IGOptions:
    """Validate and resolve the options of one integrated-gradients call."""
    alphas, weights = quadrature(method, steps)
    check_internal_batch_size(internal_batch_size)
    return IGOptions(alphas, weights, resolve_backend(backend, device), internal_batch_size,
                     bool(return_convergence_delta), progress)


@dataclass
class IGResult:
    """What the core returns: attributions per key, the convergence delta when asked, the rows per
    forward settled on, and the targets explained."""

    attributions: dict[str, torch.Tensor]
    delta: torch.Tensor | None
    chunk_rows: int
    targets: torch.Tensor


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


class _Kernels:
    """The interpolate / accumulate / finalize trio of one backend."""

    def __init__(self, backend: str) -> None:
        triton = backend == "triton"
        self.interpolate = ops.interpolate_triton if triton else ops.interpolate_torch
        self.accumulate = ops.accumulate_triton if triton else ops.accumulate_torch
        self.finalize = ops.finalize_triton if triton else ops.finalize_torch


class _ChunkRunner:
    """Runs the path rows (sample x path point) of one batch in chunks: each chunk is one forward
    and one input-only backward whose gradients are reduced into per-key accumulators.

    The logits at the inputs (for an argmax target and the convergence delta) ride along as extra
    rows of the first chunk's forward; no gradient flows from them.
    """

    def __init__(self, forward: RowsForward, xs: dict[str, torch.Tensor], bs: dict[str, torch.Tensor],
                 extra: Mapping[str, Any], options: IGOptions, need_fx: bool) -> None:
        self.forward, self.xs, self.bs, self.extra, self.options = forward, xs, bs, extra, options
        self.keys = list(xs)
        first = xs[self.keys[0]]
        self.batch, self.device = first.shape[0], first.device
        backend = options.backend
        acc_dtype = {k: torch.promote_types(x.dtype, torch.float32) for k, x in xs.items()}
        if backend == "triton" and any(d != torch.float32 for d in acc_dtype.values()):
            backend = "torch"  # the kernels accumulate in float32; float64 inputs keep their precision
        self.kernels = _Kernels(backend)
        self.accs = {k: torch.zeros(x.shape, dtype=acc_dtype[k], device=self.device) for k, x in xs.items()}
        self.need_fx = need_fx
        self.fx: torch.Tensor | None = None
        self.sizer = ChunkSizer(options.internal_batch_size, self.batch, len(options.alphas), self.device,
                                row_elements=sum(x[0].numel() for x in xs.values()))

    def _chunk(self, start: int, rows: int, endpoint_rows: int, target: Any, targets: torch.Tensor | None):
        alphas, batch, device = self.options.alphas, self.batch, self.device
        sample = torch.arange(start, start + rows, device=device) % batch
        if endpoint_rows:
            sample = torch.cat([sample, torch.arange(batch, device=device)])
        with torch.enable_grad():
            path = {k: self.kernels.interpolate(self.xs[k], self.bs[k], alphas, start, rows).requires_grad_(True)
                    for k in self.keys}
            points = {k: torch.cat([path[k], self.xs[k]]) if endpoint_rows else path[k] for k in self.keys}
            with self.sizer.watch():
                logits = _logits_2d(self.forward(points, _rows_of(self.extra, sample, batch)))
            if logits.shape[0] != rows + endpoint_rows:
                raise ValueError(f"forward returned {logits.shape[0]} rows for {rows + endpoint_rows} inputs")
            if endpoint_rows:
                self.fx = _float_logits(logits[rows:])
            if targets is None:
                targets = resolve_targets(target, self.fx, batch, logits.shape[1], device)
            score = logits[:rows].gather(1, targets.index_select(0, sample[:rows]).unsqueeze(1)).sum()
            # The path tensor is a leaf, so autograd.grad hands back exactly the [rows, ...]
            # gradients the reduction kernel consumes.
            grads = torch.autograd.grad(score, [path[k] for k in self.keys], allow_unused=True)
        return grads, targets

    def run(self, target: Any, targets: torch.Tensor | None) -> torch.Tensor:
        """Every path row; returns the targets (resolved from the first chunk when ``targets`` is None)."""
        weights = self.options.weights
        acc_weights = torch.ones_like(weights) if is_equal_weight(weights) else weights
        total = self.batch * len(self.options.alphas)
        progress = self.options.progress
        bar = tqdm(total=total, desc="integrated gradients", unit="row", leave=False,
                   disable=None if progress is None else not progress)
        start = 0
        while start < total:
            rows = min(self.sizer.rows, total - start)
            extra = self.batch if self.need_fx and self.fx is None else 0
            try:
                grads, targets = self._chunk(start, rows, extra, target, targets)
            except torch.cuda.OutOfMemoryError:
                if not self.sizer.shrink(rows):
                    raise
                torch.cuda.empty_cache()
                continue
            for k, g in zip(self.keys, grads, strict=False):
                if g is not None:
                    self.kernels.accumulate(self.accs[k], g, acc_weights, start)
            del grads
            self.sizer.end(rows + extra)
            start += rows
            bar.update(rows)
        bar.close()
        return targets

    def attributions(self, summed: set[str]) -> dict[str, torch.Tensor]:
        weights = self.options.weights
        divisor = float(len(weights)) if is_equal_weight(weights) else 1.0
        return {k: self.kernels.finalize(self.xs[k], self.bs[k], self.accs[k], divisor,
                                         k in summed).to(self.xs[k].dtype)
                for k in self.keys}


def run_integrated_gradients(forward: RowsForward, xs: dict[str, torch.Tensor], bs: dict[str, torch.Tensor],
                             options: IGOptions, *, target: Any = None, targets: torch.Tensor | None = None,
                             extra: Mapping[str, Any] | None = None, sum_last_dim: Iterable[str] = ()) -> IGResult:
    """The core, on validated inputs: ``xs`` floating, batch first, contiguous; ``bs`` expanded to
    them; ``targets`` one class per sample or None (then resolved from ``target`` and the
    endpoint logits); ``extra`` batch-first tensors (in any nesting) gathered per row."""
    summed = set(sum_last_dim)
    need_fx = targets is None and target is None or options.return_convergence_delta
    runner = _ChunkRunner(forward, xs, bs, extra or {}, options, need_fx)
    targets = runner.run(target, targets)
    attributions = runner.attributions(summed)
    delta = None
    if options.return_convergence_delta:
        batch = runner.batch
        with torch.no_grad():
            fb = _float_logits(_logits_2d(forward(bs, dict(extra or {}))))
        if fb.shape[0] != batch:
            raise ValueError(f"forward returned {fb.shape[0]} rows for a batch of {batch}")
        idx = targets.unsqueeze(1)
        gap = runner.fx.gather(1, idx).squeeze(1) - fb.gather(1, idx).squeeze(1)
        total_attr = sum(a.reshape(batch, -1).sum(dim=1).to(gap.dtype) for a in attributions.values())
        delta = total_attr - gap
    return IGResult(attributions, delta, runner.sizer.rows, targets)


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
    options = resolve_options(steps=steps, method=method, internal_batch_size=internal_batch_size, backend=backend,
                              device=xs[keys[0]].device, return_convergence_delta=return_convergence_delta,
                              progress=progress)
    result = run_integrated_gradients(lambda points, rows: forward({**points, **rows}), xs,
                                      _expand_baselines(xs, baselines), options, target=target, extra=extra,
                                      sum_last_dim=sum_last_dim)
    if return_convergence_delta:
        return result.attributions, result.delta
    return result.attributions
