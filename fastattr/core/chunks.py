"""How many path rows (sample x path point) one forward of integrated gradients takes."""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

# Most path points per forward on the CPU; larger chunks measured no faster.
CPU_MAX_POINTS = 16
# Bytes of the largest activation one CPU chunk may save. glibc serves an allocation of 32 MiB or
# more (its largest mmap threshold) with fresh pages every time, each page faulted and zeroed
# anew: measured here, a softmax or a division makes its output 3-6x slower per element from
# 33 MiB on (~1 ns per float more), and IG over 256 codes ran 1.45x slower at 32 rows a chunk
# (32 MiB attention maps) than at 16. Half that threshold leaves room for the transient tensors
# (attention scores before their softmax) that are as large as the saved ones.
CPU_TENSOR_BYTES = 16 << 20
# Bytes of saved activations one CPU chunk may hold in all: a bound on memory (a chunk holds up to
# CPU_MAX_POINTS path points of the batch, where PyHealth's loop holds one).
CPU_CHUNK_BYTES = 512 << 20
# A whole path whose interpolated inputs hold at most this many elements runs as one chunk on the
# CPU, without the probe: the probe's extra forward costs more there than any chunk size saves
# (the chunk sweep in benchmarks/RESULTS.md: 1.3x-1.5x slower with the probe at batch 1).
CPU_SMALL_PATH = 1 << 17


class RowBytes(NamedTuple):
    """What one row's forward saves for the backward, as the CPU probe measured it."""

    total: float  #: all its saved activations' bytes
    largest: float  #: the largest saved activation's bytes (its share of one row)


def _is_weight(tensor: torch.Tensor) -> bool:
    """A saved tensor that does not grow with the rows: a parameter (trained or frozen), a leaf that
    requires grad (the path's inputs, whose bytes the interpolation owns), or a view of one: ``F.linear``
    saves ``weight.t()``, which a rule on leaves alone counts (on a 3-layer d128 Transformer over 34
    positions, a quarter of the bytes a row seemed to save)."""
    base = tensor._base if tensor._base is not None else tensor
    return isinstance(base, torch.nn.Parameter) or (base.is_leaf and base.requires_grad)


class ChunkSizer:
    """Rows (sample x path point) per forward.

    Fixed when the caller gives ``internal_batch_size``, and all rows at once on the CPU for a
    small path (``CPU_SMALL_PATH`` interpolated elements in all). On CUDA every row runs in one forward
    (small clinical models are launch-bound there: fewer, larger batches are faster), and a chunk
    that runs out of memory is retried in halves (:meth:`shrink`); the size that fit is kept for
    the rest. On the CPU one path point of the batch runs first as a probe that records the bytes
    autograd saves for the backward (the activations, which scale with the rows; the parameters
    and views of them excluded), and chunks take as many rows as keep the largest activation under
    ``CPU_TENSOR_BYTES`` and all of them under ``CPU_CHUNK_BYTES``, in whole path points of the
    batch where one fits (at most ``CPU_MAX_POINTS``).
    Results do not depend on the sizes.
    """

    def __init__(self, requested: int | None, batch: int, points: int, device: torch.device,
                 row_elements: int = 0, per_row: RowBytes | None = None) -> None:
        self.batch = batch
        self.mode = "fixed" if requested is not None else ("cuda" if device.type == "cuda" else "cpu")
        if self.mode == "cpu" and batch * points * row_elements <= CPU_SMALL_PATH:
            self.mode, requested = "fixed", batch * points
        self.rows = requested if requested is not None else (batch * points if self.mode == "cuda" else batch)
        self.max_rows = batch * min(points, CPU_MAX_POINTS)
        self._saved: dict[int, int] = {}
        #: activation bytes per row the CPU probe measured (``per_row``: known already, no probe)
        self.per_row = per_row
        if self.mode == "cpu" and per_row is not None:
            self._settle(per_row)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if not _is_weight(tensor):  # the model's weights, and the inputs' path leaves, do not grow with the rows
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
            saved = self._saved.values()
            self.per_row = RowBytes(max(sum(saved), 1) / rows, max(saved, default=1) / rows)
            self._saved.clear()
            self._settle(self.per_row)

    def _settle(self, per_row: RowBytes) -> None:
        fit = int(min(CPU_CHUNK_BYTES / per_row.total, CPU_TENSOR_BYTES / per_row.largest))
        whole_points = fit // self.batch * self.batch
        self.rows = min(self.max_rows, whole_points or max(1, fit))
        self.mode = "fixed"

    def shrink(self, rows: int) -> bool:
        """A chunk of ``rows`` ran out of CUDA memory: halve (whole path points while they fit).
        False when the size was the caller's or is down to one row (the error then stands)."""
        if self.mode != "cuda" or rows <= 1:
            return False
        half = rows // 2
        self.rows = half // self.batch * self.batch if half >= self.batch else half
        return True
