"""Model-agnostic Chefer relevance from captured (attention map, attention gradient) pairs."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from fastattr.core.backend import resolve_backend
from fastattr.kernels import relevance as ops

Layer = tuple[torch.Tensor, torch.Tensor]

# Below this many multiply-adds (2 L B N^3 over the layers) the full matrix R costs less than a
# row pick's detection probe and row steps: measured on the 2-core reference CPU, 4 layers, 4 heads
# (torch path): B=1 N=16-64 0.04-0.08 ms full against 0.09-0.12 ms by rows; B=4-32 around 1e7
# even; B=32 N=128 4.9 ms full, 2.3 ms by rows. On CUDA not measured: rows are always taken there.
FULL_PATH_FLOPS = {"cpu": 2.0 ** 23, "cuda": 0.0}


def avg_heads(cam: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """PyHealth's ``avg_heads``: mean over heads of ``clamp(grad * cam, 0)``; 3-D inputs are
    taken as one head and only clamped.

    Examples:
        >>> import torch
        >>> from fastattr import avg_heads
        >>> cam = torch.tensor([[[[1.0, -1.0]], [[3.0, 1.0]]]])  # [B=1, H=2, 1, 2]
        >>> avg_heads(cam, torch.ones_like(cam))  # head 1 clamped to [1, 0], head 2 [3, 1]
        tensor([[[2.0000, 0.5000]]])
    """
    if cam.dim() < 4 and grad.dim() < 4:
        return (grad * cam).clamp(min=0)
    return (grad * cam).clamp(min=0).mean(dim=1)


def apply_self_attention_rules(R_ss: torch.Tensor, cam_ss: torch.Tensor) -> torch.Tensor:
    """PyHealth's ``apply_self_attention_rules``: ``cam_ss @ R_ss``.

    Examples:
        >>> import torch
        >>> from fastattr import apply_self_attention_rules
        >>> cam = torch.tensor([[0.5, 0.5], [0.0, 1.0]])
        >>> apply_self_attention_rules(torch.eye(2), cam)
        tensor([[0.5000, 0.5000],
                [0.0000, 1.0000]])
    """
    return torch.matmul(cam_ss, R_ss)


def full_path_is_cheaper(batch: int, tokens: int, layers: int, device: torch.device) -> bool:
    """Whether forming the whole R beats picking rows for maps of this size on ``device``."""
    return 2.0 * layers * batch * tokens ** 3 <= FULL_PATH_FLOPS.get(device.type, 0.0)


def check_layers(layers: Sequence[Layer], name: str = "layers") -> tuple[int, int]:
    """Validate ``[(attn, grad), ...]`` (first layer first); return ``(batch, tokens)``."""
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or len(layers) == 0:
        raise ValueError(f"{name} must be a non-empty list of (attention map, attention gradient) pairs")
    shape = None
    for i, layer in enumerate(layers):
        if not isinstance(layer, (tuple, list)) or len(layer) != 2:
            raise ValueError(f"{name}[{i}] must be an (attention map, attention gradient) pair")
        attn, grad = layer
        if not isinstance(attn, torch.Tensor):
            raise ValueError(f"{name}[{i}] has no attention map (got {type(attn).__name__}): the forward did "
                             "not record this layer's attention")
        if not isinstance(grad, torch.Tensor):
            raise ValueError(f"{name}[{i}] has no attention gradient (got {type(grad).__name__}): the backward "
                             "did not reach this attention layer, so the target does not depend on it")
        if attn.shape != grad.shape:
            raise ValueError(f"{name}[{i}]: attention map {tuple(attn.shape)} and gradient {tuple(grad.shape)} "
                             "differ in shape")
        if attn.dim() not in (3, 4) or attn.shape[-1] != attn.shape[-2]:
            raise ValueError(f"{name}[{i}]: expected maps of shape [B, H, N, N] or [B, N, N]; got {tuple(attn.shape)}")
        if not attn.is_floating_point():
            raise ValueError(f"{name}[{i}]: attention maps must be floating point; got {attn.dtype}")
        here = (attn.shape[0], attn.shape[-1])
        if shape is not None and here != shape:
            raise ValueError(f"{name}[{i}] has batch and tokens {here}, layer 0 has {shape}")
        shape = here
    return shape


def chefer_relevance(layers: Sequence[Layer], rows: torch.Tensor | None = None, *,
                     backend: str | None = None) -> torch.Tensor:
    """Chefer relevance R = (I + C_L)...(I + C_1), C_l = mean_h clamp(A_l * G_l, 0).

    Args:
        layers: ``[(attn, grad), ...]`` ordered first layer to last, each ``[B, H, N, N]`` or
            ``[B, N, N]`` (already one head: no averaging).
        rows: ``None`` for the full ``R`` ``[B, N, N]``; or one row index per sample
            (LongTensor ``[B]``) for just those rows ``R[b, rows[b]]`` as ``[B, N]``, computed
            exactly by pushing row vectors from the last layer to the first in O(L N^2).
        backend: ``"auto" | "torch" | "triton"``; ``None`` reads ``FASTATTR_BACKEND``.

    Returns:
        float32 relevance (float64 when the maps are float64), detached.

    Examples:
        >>> import torch
        >>> from fastattr import chefer_relevance
        >>> _ = torch.manual_seed(0)
        >>> attn = torch.softmax(torch.randn(2, 4, 5, 5), dim=-1)  # [B, H, N, N]
        >>> grad = torch.randn(2, 4, 5, 5)
        >>> R = chefer_relevance([(attn, grad), (attn, grad)])  # two layers
        >>> R.shape
        torch.Size([2, 5, 5])
        >>> rows = chefer_relevance([(attn, grad), (attn, grad)], rows=torch.tensor([0, 3]))
        >>> rows.shape, torch.allclose(rows, R[[0, 1], [0, 3]])  # the same rows, in O(L N^2)
        (torch.Size([2, 5]), True)
    """
    batch, tokens = check_layers(layers)
    use = resolve_backend(backend, layers[0][0].device)
    if rows is not None:
        if not isinstance(rows, torch.Tensor) or rows.dtype not in (torch.int32, torch.int64) or rows.shape != (batch,):
            raise ValueError(f"rows must be a LongTensor of shape [{batch}] (one row per sample); got {rows!r}")
        if bool(((rows < 0) | (rows >= tokens)).any()):
            raise ValueError(f"rows must lie in [0, {tokens}); got {rows.tolist()}")
    return propagate(layers, rows, use)


def propagate(layers: Sequence[Layer], rows: torch.Tensor | None, use: str) -> torch.Tensor:
    """:func:`chefer_relevance` on validated layers and rows with a resolved backend (``"torch"``
    or ``"triton"``): the core, which trusts its arguments."""
    attn0 = layers[0][0]
    batch, tokens, device = attn0.shape[0], attn0.shape[-1], attn0.device
    dtype = torch.float64 if attn0.dtype == torch.float64 else torch.float32
    if use == "triton" and dtype == torch.float64:
        use = "torch"  # the kernels accumulate in float32; float64 maps keep their precision
    with torch.no_grad():
        if rows is None:
            R = torch.eye(tokens, dtype=dtype, device=device).expand(batch, tokens, tokens).contiguous()
            step = ops.full_step_triton if use == "triton" else ops.full_step_torch
            for attn, grad in layers:
                R = step(R, attn.detach(), grad.detach())
            return R
        v = torch.nn.functional.one_hot(rows.to(device).long(), tokens).to(dtype)
        step = ops.row_step_triton if use == "triton" else ops.row_step_torch
        for attn, grad in reversed(layers):
            v = step(v, attn.detach(), grad.detach())
        return v
