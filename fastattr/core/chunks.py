"""How many path rows (sample x path point) one forward of integrated gradients takes."""
from __future__ import annotations

import contextlib

import torch

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
                 row_elements: int = 0, per_row: float | None = None) -> None:
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
            self.per_row = max(sum(self._saved.values()), 1) / rows
            self._saved.clear()
            self._settle(self.per_row)

    def _settle(self, per_row: float) -> None:
        self.rows = min(self.max_rows, max(self.batch, int(CPU_CHUNK_BYTES / per_row) // self.batch * self.batch))
        self.mode = "fixed"

    def shrink(self, rows: int) -> bool:
        """A chunk of ``rows`` ran out of CUDA memory: halve (whole path points while they fit).
        False when the size was the caller's or is down to one row (the error then stands)."""
        if self.mode != "cuda" or rows <= 1:
            return False
        half = rows // 2
        self.rows = half // self.batch * self.batch if half >= self.batch else half
        return True
