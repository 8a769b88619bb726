"""Choice of compute backend: fused Triton kernels or the plain-torch reference."""
from __future__ import annotations

import importlib.util
import os

import torch

from fastattr.kernels._triton import interpreting

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "FASTATTR_BACKEND"


def triton_available() -> bool:
    """True when the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True when Triton kernels run on the CPU through Triton's interpreter."""
    return interpreting()


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Turn a requested backend (``None`` reads ``FASTATTR_BACKEND``) into ``"torch"`` or ``"triton"``.

    ``auto`` picks Triton for CUDA tensors when Triton imports and torch otherwise. An explicit
    ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1`` set before fastattr is imported.
    """
    name = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    if not isinstance(name, str) or name not in BACKENDS:
        source = "backend" if backend is not None else f"environment variable {ENV_VAR}"
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if name == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package: pip install triton")
        if device.type != "cuda" and not interpreter_enabled():
            raise RuntimeError(
                f"backend='triton' got tensors on {device.type}; Triton compiles for CUDA only. "
                "Move the model and batch to a GPU, use backend='torch', or set TRITON_INTERPRET=1 "
                "before importing fastattr to run the kernels in Triton's CPU interpreter."
            )
    return name
