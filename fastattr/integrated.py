"""Model-agnostic integrated gradients with the path steps batched into few forwards."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import contextlib

import torch
from tqdm.auto import tqdm

from fastattr.backend import resolve_backend
from fastattr.quadrature import is_equal_weight, quadrature
from fastattr.kernels import interpolate as ops

Forward = Callable[[dict[str, Any]], torch.Tensor]

# Most path points per forward on the CPU; larger chunks measured no faster.
CPU_MAX_POINTS = 16
# Bytes of saved activations one CPU chunk may hold. Measured on the 2-core reference CPU with
# PyHealth's 2-layer Transformer: the fastest chunks held ~50-80 MiB of activations for 40, 128
# and 256 codes alike (16, 4 and 2 path points of the batch).
CPU_CHUNK_BYTES = 64 << 20
# Fraction of the free CUDA memory one chunk's activations may take.
CUDA_MEMORY_FRACTION = 0.5


class ChunkSizer:
    """Rows (sample x path point) per forward.

    Fixed when the caller gives ``internal_batch_size``. Otherwise one path point of the batch
    runs first as a probe. On CUDA the rest run in chunks sized from the probe's peak memory and
    the free memory. On the CPU the probe counts the bytes autograd saves for the backward (the
    activations, which scale with the rows; parameters excluded), and chunks are sized so their
    activations stay near ``CPU_CHUNK_BYTES``: large enough to batch well, small enough to stay in
    cache rather than stream through memory. Results do not depend on the sizes.
    """

    def __init__(self, requested: int | None, batch: int, points: int, device: torch.device) -> None:
        self.batch, self.device = batch, device
        self.rows = requested if requested is not None else batch
        self.mode = "fixed" if requested is not None else ("cuda" if device.type == "cuda" else "cpu")
        self.max_rows = batch * min(points, CPU_MAX_POINTS)
        self._mark = 0
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

    def begin(self) -> None:
        if self.mode == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._mark = torch.cuda.memory_allocated(self.device)

    def end(self, rows: int) -> None:
        if self.mode == "cuda":
            per_row = max(torch.cuda.max_memory_allocated(self.device) - self._mark, 1) / rows
            free, _ = torch.cuda.mem_get_info(self.device)
            self.rows = max(self.batch, int(CUDA_MEMORY_FRACTION * free / per_row) // self.batch * self.batch)
        elif self.mode == "cpu":
            per_row = max(sum(self._saved.values()), 1) / rows
            self.rows = min(self.max_rows, max(self.batch, int(CPU_CHUNK_BYTES / per_row) // self.batch * self.batch))
            self._saved.clear()
        self.mode = "fixed"


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


def resolve_targets(target: int | torch.Tensor | None, logits: torch.Tensor | None, batch: int,
                    num_classes: int, device: torch.device) -> torch.Tensor:
    """One class index per sample, PyHealth's rules: a single logit column always targets 0;
    otherwise ``target`` (an int or one index per sample), else the argmax of ``logits``."""
    if num_classes == 1:
        return torch.zeros(batch, dtype=torch.long, device=device)
    if target is None:
        if logits is None:
            raise ValueError("target is None and no logits were given to take the argmax of")
        return logits.argmax(dim=-1).to(device)
    if isinstance(target, torch.Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(f"target_class_idx tensor must hold integers; got dtype {target.dtype}")
        t = target.reshape(-1).to(device=device, dtype=torch.long)
        if t.numel() == 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise ValueError(f"target_class_idx must hold one class per sample ({batch}); got {target.numel()}")
    elif isinstance(target, int) and not isinstance(target, bool):
        t = torch.full((batch,), target, dtype=torch.long, device=device)
    else:
        raise TypeError(f"target_class_idx must be an int, a LongTensor or None; got {type(target).__name__}")
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
        steps: subintervals of the quadrature rule ``method`` (see ``fastattr.quadrature``).
        internal_batch_size: rows (sample x path point) per forward; results do not depend on it.
            Default: sized by :class:`ChunkSizer` from a one-point probe (free memory on CUDA,
            activation bytes on the CPU).
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
    extra = dict(additional_inputs or {})
    clash = set(extra) & set(keys)
    if clash:
        raise ValueError(f"additional_inputs reuse input keys: {sorted(clash)}")
    device = xs[keys[0]].device
    use = resolve_backend(backend, device)

    def rows_of(tensors: Mapping[str, Any], sample: torch.Tensor) -> dict[str, Any]:
        return {k: v.index_select(0, sample) if isinstance(v, torch.Tensor) and v.dim() > 0
                and v.shape[0] == batch else v for k, v in tensors.items()}

    def endpoint_logits(points: Mapping[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            logits = _logits_2d(forward({**points, **extra}))
            return logits.to(torch.promote_types(logits.dtype, torch.float32))

    fx = endpoint_logits(xs) if target is None or return_convergence_delta else None
    if fx is not None and fx.shape[0] != batch:
        raise ValueError(f"forward returned {fx.shape[0]} rows for a batch of {batch}")
    # Without endpoint logits the class count (to check the target) comes from the first chunk.
    targets = resolve_targets(target, fx, batch, fx.shape[1], device) if fx is not None else None

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
        sizer.begin()
        with torch.enable_grad():
            path = {k: interpolate(xs[k], bs[k], alphas, start, rows).requires_grad_(True) for k in keys}
            sample = torch.arange(start, start + rows, device=device) % batch
            with sizer.watch():
                logits = _logits_2d(forward({**path, **rows_of(extra, sample)}))
            if logits.shape[0] != rows:
                raise ValueError(f"forward returned {logits.shape[0]} rows for {rows} inputs")
            if targets is None:
                targets = resolve_targets(target, None, batch, logits.shape[1], device)
            score = logits.gather(1, targets.index_select(0, sample).unsqueeze(1)).sum()
            # The path tensor is a leaf, so autograd.grad hands back exactly the [rows, ...]
            # gradients the reduction kernel consumes; wrapping construction and reduction in an
            # autograd.Function would still materialize that same gradient, plus a backward node.
            grads = torch.autograd.grad(score, [path[k] for k in keys], allow_unused=True)
        for k, g in zip(keys, grads):
            if g is not None:
                accumulate(accs[k], g, acc_weights, start)
        del path, logits, score, grads
        sizer.end(rows)
        start += rows
        bar.update(rows)
    bar.close()
    if stats is not None:
        stats["chunk_rows"] = sizer.rows

    attributions = {k: finalize(xs[k], bs[k], accs[k], divisor, k in summed).to(xs[k].dtype) for k in keys}
    if not return_convergence_delta:
        return attributions
    fb = endpoint_logits(bs)
    rows_idx = targets.unsqueeze(1)
    gap = fx.gather(1, rows_idx).squeeze(1) - fb.gather(1, rows_idx).squeeze(1)
    total_attr = sum(a.reshape(batch, -1).sum(dim=1).to(gap.dtype) for a in attributions.values())
    return attributions, total_attr - gap
