"""The one place the kernels import Triton, and the launch settings every launcher shares.

Importing works without Triton (``triton`` is then ``None``): the torch references need nothing
else, and a Triton launcher raises :func:`need_triton`'s error when called.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path works without Triton
    triton = None
    tl = None

# CUDA's launch limits: grid axis x up to 2^31 - 1 blocks, axes y and z up to 65,535. Every
# launcher here flattens its work onto axis x.
MAX_GRID_X = 2**31 - 1
MAX_GRID_YZ = 65_535
# The target the occupancy rules are written for: an H100 SXM has 132 SMs. A launch should give
# every SM at least two blocks at the product shapes.
TARGET_SMS = 132
MIN_WAVES = 2


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (``TRITON_INTERPRET=1``, read at import time)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def need_triton(what: str) -> None:
    """Raise a clear error when a Triton launcher is called without the triton package."""
    if triton is None:
        raise RuntimeError(f"the Triton {what} kernels need the triton package: pip install triton")


def autotune(configs: list, key: list[str], **options):
    """``triton.autotune`` over ``configs`` keyed on ``key`` (plus the pointer dtypes, which
    Triton adds itself). The interpreter cannot time configs, so there only the first runs: list
    the configuration that is right for the CPU tests first."""
    return triton.autotune(configs=configs[:1] if interpreting() else configs, key=key, **options)


def vector_alignment(tensors: tuple[torch.Tensor, ...], length: int) -> int:
    """The widest power-of-two element count (up to 16 bytes) that every row start of these
    tensors is aligned to (their data pointers and all strides but the last) and that divides the
    row ``length``. Kernels take it as a ``tl.multiple_of`` hint on offsets and on the row-length
    bound of their masks, so rows of a length Triton does not specialise on (N = 100) still load
    16 bytes at a time."""
    align = 16
    for t in tensors:
        size = t.element_size()
        common = length
        for part in (t.data_ptr() // size if t.device.type != "meta" else 0, *t.stride()[:-1]):
            common = math.gcd(common, int(part))
        align = min(align, 16 // size, (common & -common) if common else 16)
    return max(align, 1)


def flat_grid(programs: int) -> tuple[int]:
    """A 1-D grid of ``programs`` blocks; refuses sizes CUDA cannot launch."""
    if programs > MAX_GRID_X:
        raise ValueError(f"{programs} blocks exceed CUDA's grid limit of {MAX_GRID_X}")
    return (programs,)


@contextlib.contextmanager
def ieee_float32_matmul() -> Iterator[None]:
    """float32 matrix products in full IEEE precision (no TF32) inside the block, whatever the
    caller set globally; restored afterwards. The <= 1e-5 parity claim needs it: TF32 rounds
    operands to 10 mantissa bits."""
    previous = torch.get_float32_matmul_precision()
    if previous == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
