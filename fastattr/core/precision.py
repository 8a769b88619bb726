"""Arithmetic for the model's own forward and backward: exact float32 by default, or faster
tensor-core modes opted into, with every reduction of fastattr's own kept in float32.

- ``"fp32"`` (default): IEEE float32, what PyHealth computes; the parity claims hold.
- ``"tf32"``: on CUDA the model's matmuls and convolutions use TF32 tensor cores (10-bit
  mantissa inputs, float32 accumulation). No effect on the CPU, which has no TF32.
- ``"bf16"``: the model's forward (and so its backward) runs under ``torch.autocast`` in
  bfloat16, on CUDA and on the CPU.

Only the model's calls run in the mode: the IG path, its gradient accumulation and
finalisation, the convergence delta and Chefer's relevance recursion stay float32 (Chefer's
products are forced to IEEE float32 whatever the global TF32 setting). What each mode costs in
fidelity is measured by ``python -m benchmarks.precision`` and stated in the README.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

PRECISIONS = ("fp32", "tf32", "bf16")


def model_precision(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """A context running the model's calls inside in ``precision`` on ``device`` (see the module
    docstring); for fp32 (and tf32 off CUDA) one that does nothing."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "tf32" and device.type == "cuda":
        return _tf32()
    return contextlib.nullcontext()


@contextlib.contextmanager
def _tf32() -> Iterator[None]:
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
