"""Model-agnostic integrated gradients with the path steps batched into few forwards."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import contextlib
import numbers

import numpy as np
import torch
from tqdm.auto import tqdm

from fastattr.core.backend import resolve_backend
from fastattr.core.quadrature import is_equal_weight, quadrature
from fastattr.kernels import interpolate as ops

Forward = Callable[[dict[str, Any]], torch.Tensor]

# Most path points per forward on the CPU; larger chunks measured no faster.
CPU_MAX_POINTS = 16
# Bytes of saved activations one CPU chunk may hold. Measured on the 2-core reference CPU with
# PyHealth's 2-layer Transformer: the fastest chunks held ~50-80 MiB of activations for 40, 128
# and 256 codes alike (16, 4 and 2 path points of the batch).
CPU_CHUNK_BYTES = 64 << 20


class ChunkSizer:
    """Rows (sample x path point) per forward.

    Fixed when the caller gives ``internal_batch_size``. On CUDA every row runs in one forward
    (small clinical models are launch-bound there: fewer, larger batches are faster), and a chunk
    that runs out of memory is retried in halves (:meth:`shrink`); the size that fit is kept for
    the rest. On the CPU one path point of the batch runs first as a probe that counts the bytes
    autograd saves for the backward (the activations, which scale with the rows; parameters
    excluded), and chunks are sized so their activations stay near ``CPU_CHUNK_BYTES``: large
    enough to batch well, small enough to stay in cache rather than stream through memory.
    Results do not depend on the sizes.
    """

    def __init__(self, requested: int | None, batch: int, points: int, device: torch.device) -> None:
        self.batch = batch
        self.mode = "fixed" if requested is not None else ("cuda" if device.type == "cuda" else "cpu")
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
    if internal_batch_size is not None and (isinstance(internal_batch_size, bool) or
                                            not isinstance(internal_batch_size, int) or internal_batch_size < 1):
        raise ValueError(f"internal_batch_size must be an integer >= 1; got {internal_batch_size!r}")


def _logits_2d(logits: Any) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"forward must return a logits tensor; got {type(logits).__name__}")
    if logits.dim() == 1:
        return logits.unsqueeze(1)
    if logits.dim() != 2:
        raise ValueError(f"forward must return logits of shape [batch, classes]; got {tuple(logits.shape)}")
    return logits


def _target_tensor(target: Any, batch: int, device: torch.device) -> torch.Tensor:
    """``target`` as one class index per sample: any integral scalar (Python int, numpy integer,
    0-dim integer tensor) for every sample, or a 1-D integer tensor, array or sequence of one class
    per sample. Bools and floats are refused."""
    if isinstance(target, (bool, np.bool_)):
        raise TypeError(f"target_class_idx must be an integer class index, not a bool; got {target!r}")
    if isinstance(target, numbers.Integral):
        return torch.full((batch,), int(target), dtype=torch.long, device=device)
    if isinstance(target, (np.ndarray, list, tuple)):
        try:
            array = np.asarray(target)
        except ValueError:
            array = np.asarray(target, dtype=object)
        if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"target_class_idx must hold integer class indices; got {array.dtype} values")
        target = torch.as_tensor(array)
    if not isinstance(target, torch.Tensor):
        raise TypeError("target_class_idx must be an integer, one integer per sample (tensor, array or list) or "
                        f"None; got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target_class_idx tensor must hold integers; got dtype {target.dtype}")
    if target.dim() > 1:
        raise ValueError(f"target_class_idx must be a scalar or 1-D (one class per sample); got shape "
                         f"{tuple(target.shape)}")
    t = target.reshape(-1).to(device=device, dtype=torch.long)
    if t.numel() == 1:
        return t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"target_class_idx must hold one class per sample ({batch}); got {target.numel()}")
    return t


def resolve_targets(target: Any, logits: torch.Tensor | None, batch: int,
                    num_classes: int, device: torch.device) -> torch.Tensor:
    """One class index per sample, PyHealth's rules: a single logit column always targets 0;
    otherwise ``target`` (an int or one index per sample), else the argmax of ``logits``."""
    if num_classes == 1:
        return torch.zeros(batch, dtype=torch.long, device=device)
    if target is None:
        if logits is None:
            raise ValueError("target is None and no logits were given to take the argmax of")
        return logits.argmax(dim=-1).to(device)
    t = _target_tensor(target, batch, device)
    if bool(((t < 0) | (t >= num_classes)).any()):
        bad = t[(t < 0) | (t >= num_classes)][0].item()
        raise ValueError(f"target_class_idx {bad} is out of range for {num_classes} classes")
    return t.contiguous()


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


def _expand_baselines(inputs: Mapping[str, torch.Tensor], baselines: Mapping[str, Any] | None) -> dict[str, torch.Tensor]:
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


def _float_logits(logits: torch.Tensor) -> torch.Tensor:
    return logits.detach().to(torch.promote_types(logits.dtype, torch.float32))


def _rows_of(tensors: Mapping[str, Any], sample: torch.Tensor, batch: int) -> dict[str, Any]:
    """The given rows of every batch-first tensor; anything else unchanged."""
    return {k: v.index_select(0, sample) if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch
            else v for k, v in tensors.items()}


def _chunk_gradients(forward: Forward, xs: Mapping[str, torch.Tensor], bs: Mapping[str, torch.Tensor],
                     alphas: torch.Tensor, start: int, rows: int, endpoint_rows: int, batch: int,
                     extra_inputs: Mapping[str, Any], interpolate: Callable, sizer: ChunkSizer,
                     target: int | torch.Tensor | None, targets: torch.Tensor | None):
    """One forward and input-gradient backward of path rows ``[start, start + rows)``.

    With ``endpoint_rows`` (= batch), the inputs themselves ride along as extra rows of the same
    forward, and their logits (no gradient flows from them) come back as the endpoint logits;
    the targets are resolved from them when ``target`` is None. Returns
    ``(gradients per input key, targets, endpoint logits or None)``.
    """
    keys = list(xs)
    device = xs[keys[0]].device
    sample = torch.arange(start, start + rows, device=device) % batch
    if endpoint_rows:
        sample = torch.cat([sample, torch.arange(batch, device=device)])
    with torch.enable_grad():
        path = {k: interpolate(xs[k], bs[k], alphas, start, rows).requires_grad_(True) for k in keys}
        points = {k: torch.cat([path[k], xs[k]]) if endpoint_rows else path[k] for k in keys}
        with sizer.watch():
            logits = _logits_2d(forward({**points, **_rows_of(extra_inputs, sample, batch)}))
        if logits.shape[0] != rows + endpoint_rows:
            raise ValueError(f"forward returned {logits.shape[0]} rows for {rows + endpoint_rows} inputs")
        endpoint = _float_logits(logits[rows:]) if endpoint_rows else None
        if targets is None:
            targets = resolve_targets(target, endpoint, batch, logits.shape[1], device)
        score = logits[:rows].gather(1, targets.index_select(0, sample[:rows]).unsqueeze(1)).sum()
        # The path tensor is a leaf, so autograd.grad hands back exactly the [rows, ...]
        # gradients the reduction kernel consumes; wrapping construction and reduction in an
        # autograd.Function would still materialize that same gradient, plus a backward node.
        grads = torch.autograd.grad(score, [path[k] for k in keys], allow_unused=True)
    return grads, targets, endpoint


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
    stats: dict[str, Any] | None = None,
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
        stats: a dict that receives ``"chunk_rows"``, the rows per forward settled on.

    Returns:
        ``{key: attribution}`` (input shape, or without the last dim for ``sum_last_dim`` keys),
        and the convergence delta ``[batch]`` when asked. Only input gradients are taken: no
        parameter's ``.grad`` is touched.
    """
    batch = _validate_batch(inputs)
    alphas, weights = quadrature(method, steps)
    check_internal_batch_size(internal_batch_size)
    keys = list(inputs)
    summed = set(sum_last_dim)
    unknown = summed - set(keys)
    if unknown:
        raise ValueError(f"sum_last_dim names keys that are not inputs: {sorted(unknown)}")
    xs = {k: inputs[k].detach().contiguous() for k in keys}
    bs = _expand_baselines(xs, baselines)
    extra_inputs = dict(additional_inputs or {})
    clash = set(extra_inputs) & set(keys)
    if clash:
        raise ValueError(f"additional_inputs reuse input keys: {sorted(clash)}")
    device = xs[keys[0]].device
    use = resolve_backend(backend, device)

    def endpoint_logits(points: Mapping[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return _float_logits(_logits_2d(forward({**points, **extra_inputs})))

    # The logits at the input (for the argmax target and the convergence delta) come from extra
    # rows of the first chunk's forward, not from a forward of their own.
    fx: torch.Tensor | None = None
    need_fx = target is None or return_convergence_delta
    targets = None

    equal = is_equal_weight(weights)
    acc_weights = torch.ones_like(weights) if equal else weights
    divisor = float(len(weights)) if equal else 1.0
    acc_dtype = {k: torch.promote_types(xs[k].dtype, torch.float32) for k in keys}
    accs = {k: torch.zeros(xs[k].shape, dtype=acc_dtype[k], device=device) for k in keys}
    if use == "triton" and any(acc.dtype != torch.float32 for acc in accs.values()):
        use = "torch"  # the kernels accumulate in float32; float64 inputs keep their precision
    if use == "triton":
        accumulate, interpolate, finalize = ops.accumulate_triton, ops.interpolate_triton, ops.finalize_triton
    else:
        accumulate, interpolate, finalize = ops.accumulate_torch, ops.interpolate_torch, ops.finalize_torch

    total = batch * len(alphas)
    sizer = ChunkSizer(internal_batch_size, batch, len(alphas), device)
    bar = tqdm(total=total, desc="integrated gradients", unit="row", leave=False,
               disable=None if progress is None else not progress)
    start = 0
    while start < total:
        rows = min(sizer.rows, total - start)
        extra = batch if need_fx and fx is None else 0
        try:
            result = _chunk_gradients(forward, xs, bs, alphas, start, rows, extra, batch, extra_inputs,
                                      interpolate, sizer, target, targets)
        except torch.cuda.OutOfMemoryError:
            if not sizer.shrink(rows):
                raise
            torch.cuda.empty_cache()
            continue
        grads, targets, endpoint = result
        if endpoint is not None:
            fx = endpoint
        for k, g in zip(keys, grads):
            if g is not None:
                accumulate(accs[k], g, acc_weights, start)
        del grads
        sizer.end(rows + extra)
        start += rows
        bar.update(rows)
    bar.close()
    if stats is not None:
        stats["chunk_rows"] = sizer.rows

    attributions = {k: finalize(xs[k], bs[k], accs[k], divisor, k in summed).to(xs[k].dtype) for k in keys}
    if not return_convergence_delta:
        return attributions
    fb = endpoint_logits(bs)
    if fb.shape[0] != batch:
        raise ValueError(f"forward returned {fb.shape[0]} rows for a batch of {batch}")
    rows_idx = targets.unsqueeze(1)
    gap = fx.gather(1, rows_idx).squeeze(1) - fb.gather(1, rows_idx).squeeze(1)
    total_attr = sum(a.reshape(batch, -1).sum(dim=1).to(gap.dtype) for a in attributions.values())
    return attributions, total_attr - gap
