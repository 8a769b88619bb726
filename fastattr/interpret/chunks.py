"""Running many rows through a model in chunks: one rule for every no-grad row engine (the
evaluator's ablations, SHAP's coalitions, LIME's perturbations).

Rows run at the batch's own width run in forwards of the batch's own row count, the shapes of
PyHealth's forwards (the last chunk filled up with copies of its first row), so that each row is
computed as PyHealth computes it: a math library may pick its kernel, and with it the summation
order, by the number of rows (an AMD EPYC scored PyHealth's Transformer 1.5e-6 apart otherwise).
Other rows run in as few forwards as memory allows: every row on CUDA (halved on out-of-memory),
:data:`CPU_FORWARD_POSITIONS` padded positions on the CPU.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

# Padded positions per no-grad forward on the CPU (rows x positions). Measured on the 2-core reference
# CPU (PyHealth's 4-layer, dim-64 Transformer, 256 long-tailed patients, 3 classes, padded widths 52-238):
# 1,024 / 2,048 / 4,096 / 8,192 / 16,384 positions took 3.3 / 3.0-3.4 / 2.9-3.5 / 3.1 / 6.3 s.
CPU_FORWARD_POSITIONS = 4096

RowsFn = Callable[[slice | torch.Tensor], torch.Tensor]


def memory_rows(rows: int, positions: int, device: torch.device) -> int:
    """Rows per forward where no shape is asked for: all ``rows`` on CUDA, else
    :data:`CPU_FORWARD_POSITIONS` over the ``positions`` each row has."""
    if device.type == "cuda":
        return max(1, rows)
    return max(1, CPU_FORWARD_POSITIONS // max(1, positions))


def positions_of(shapes: list[torch.Size | tuple[int, ...]]) -> int:
    """Padded positions of one row: the product of each value's dims after the batch dim, summed."""
    return sum(math.prod(shape[1:]) for shape in shapes)


def run_in_chunks(forward: RowsFn, size: int, chunk: int, *, fill: bool = False) -> torch.Tensor:
    """``forward(rows)`` over ``size`` rows in chunks of ``chunk`` (a slice, or a LongTensor where a
    chunk is filled up to ``chunk`` rows with copies of its first row when ``fill``), concatenated;
    the chunk halves on CUDA out-of-memory (and stops filling)."""
    outs, start = [], 0
    with torch.no_grad():
        while start < size:
            stop = min(size, start + chunk)
            rows: slice | torch.Tensor = slice(start, stop)
            if fill and stop - start < chunk:
                rows = torch.cat([torch.arange(start, stop), torch.full((chunk - stop + start,), start)])
            try:
                out = forward(rows)
            except torch.cuda.OutOfMemoryError:
                if chunk == 1:
                    raise
                chunk, fill = max(1, chunk // 2), False
                torch.cuda.empty_cache()
                continue
            outs.append(out[:stop - start])
            start = stop
    return torch.cat(outs)
