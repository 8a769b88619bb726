"""Kernels alone against their torch references, in GB/s, beside the card's copy bandwidth.

    python benchmarks/kernels_gpu.py                # on a CUDA device
    TRITON_INTERPRET=1 python benchmarks/kernels_gpu.py --device cpu --small   # smoke test only

Bytes counted are the ones each operation must move at least once (inputs read once, outputs
written once); GB/s = those bytes / median time. The copy bandwidth is a device-to-device
``clone`` of a 1 GiB tensor (read + write). For the Chefer row path the floor is reading every
attention map and gradient once at that bandwidth. Every kernel result is checked against its
torch reference before timing.
"""
from __future__ import annotations

import argparse

import torch

from fastattr.bench import time_interleaved
from fastattr.kernels import interpolate as ig_ops
from fastattr.kernels import relevance as rel_ops
from fastattr.quadrature import quadrature


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms / 1e3) / 1e9


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny shapes (interpreter smoke test)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    dev = args.device
    small = args.small
    reps = 2 if small else args.repeats

    copy_src = torch.empty((1 << 16) if small else (1 << 28), device=dev)  # 1 GiB of float32 on a GPU
    copy = time_interleaved({"copy": lambda: copy_src.clone()}, reps, dev)["copy"]["median_ms"]
    copy_bw = gbps(2 * copy_src.numel() * 4, copy)
    print(f"device {dev} ({torch.cuda.get_device_name() if dev.startswith('cuda') else 'cpu'}), torch "
          f"{torch.__version__}; copy bandwidth (clone, read + write) {copy_bw:.0f} GB/s")
    print("| operation | shape | dtype | torch ms | triton ms | torch GB/s | triton GB/s | triton / copy bw |")
    print("|---|---|---|---|---|---|---|---|")

    def row(op: str, shape: str, dtype: torch.dtype, nbytes: float, stats: dict) -> None:
        t, k = stats["torch"]["median_ms"], stats["triton"]["median_ms"]
        print(f"| {op} | {shape} | {str(dtype).replace('torch.', '')} | {t:.3f} | {k:.3f} | {gbps(nbytes, t):.0f} | "
              f"{gbps(nbytes, k):.0f} | {gbps(nbytes, k) / copy_bw:.2f} |")

    batch, n, d = (2, 17, 8) if small else (32, 100, 128)
    alphas, weights = quadrature("uniform", 50)
    rows = batch * 17  # a chunk of 17 path points
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(batch, n, d, device=dev).to(dtype)
        b = torch.randn(batch, n, d, device=dev).to(dtype)
        ref = ig_ops.interpolate_torch(x.float(), b.float(), alphas, 0, rows)
        torch.testing.assert_close(ig_ops.interpolate_triton(x, b, alphas, 0, rows).float(), ref.to(dtype).float(),
                                   rtol=2e-2, atol=2e-2)
        stats = time_interleaved({"torch": lambda: ig_ops.interpolate_torch(x, b, alphas, 0, rows),
                                  "triton": lambda: ig_ops.interpolate_triton(x, b, alphas, 0, rows)}, reps, dev)
        row("IG path construction (17 points)", f"B={batch} N={n} D={d}", dtype,
            2 * x.numel() * x.element_size() + rows * n * d * x.element_size(), stats)
        grads = torch.randn(rows, n, d, device=dev).to(dtype)
        acc_t = torch.zeros(batch, n, d, device=dev)
        acc_k = torch.zeros(batch, n, d, device=dev)
        ig_ops.accumulate_torch(acc_t, grads.float(), weights, 0)
        ig_ops.accumulate_triton(acc_k, grads, weights, 0)
        torch.testing.assert_close(acc_k, acc_t, rtol=1e-4, atol=1e-4)
        stats = time_interleaved({"torch": lambda: ig_ops.accumulate_torch(acc_t, grads, weights, 0),
                                  "triton": lambda: ig_ops.accumulate_triton(acc_k, grads, weights, 0)}, reps, dev)
        row("IG gradient reduction (17 points)", f"B={batch} N={n} D={d}", dtype,
            grads.numel() * grads.element_size() + 2 * acc_t.numel() * 4, stats)

    shapes = [(2, 2, 17, 2)] if small else [(32, 4, 512, 6), (8, 4, 2048, 6)]
    for batch, heads, n, layers in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            stack = [(torch.rand(batch, heads, n, n, device=dev).softmax(-1).to(dtype),
                      torch.randn(batch, heads, n, n, device=dev).to(dtype)) for _ in range(layers)]
            v0 = torch.nn.functional.one_hot(torch.zeros(batch, dtype=torch.long, device=dev), n).float()

            def push(step):
                v = v0
                for attn, grad in reversed(stack):
                    v = step(v, attn, grad)
                return v
            torch.testing.assert_close(push(rel_ops.row_step_triton), push(rel_ops.row_step_torch), rtol=2e-2, atol=1e-3)
            stats = time_interleaved({"torch": lambda: push(rel_ops.row_step_torch),
                                      "triton": lambda: push(rel_ops.row_step_triton)}, reps, dev)
            nbytes = 2 * layers * batch * heads * n * n * stack[0][0].element_size()
            row(f"Chefer row path, {layers} layers (floor {nbytes / copy_bw / 1e6:.3f} ms)",
                f"B={batch} H={heads} N={n}", dtype, nbytes, stats)
        if n <= 512:
            R = torch.randn(batch, n, n, device=dev)
            attn, grad = stack[0]
            stats = time_interleaved({"torch": lambda: rel_ops.full_step_torch(R, attn, grad),
                                      "triton": lambda: rel_ops.full_step_triton(R, attn, grad)}, reps, dev)
            row("Chefer full path, one layer", f"B={batch} H={heads} N={n}", attn.dtype,
                2 * attn.numel() * attn.element_size() + 2 * R.numel() * 4, stats)


if __name__ == "__main__":
    main()
