"""The Triton kernels alone on a CUDA device, against their torch references and the card's ceilings.

    python -m benchmarks.kernels_gpu [--quick] [--csv out.csv]

Times come from ``triton.testing.do_bench`` (CUDA events, L2 flushed before every call, median)
on device-resident inputs. Every kernel's result is checked against its torch reference, on fresh
random inputs, before it is timed. Bandwidth-bound kernels are reported in GB/s of the bytes they
must move (inputs read once, outputs written once) beside a measured device-to-device copy; the
full relevance path (an O(N^3) product) in TFLOP/s beside cuBLAS's IEEE float32 ``baddbmm`` alone.
Shapes keep the bytes of one timed call at 4x the L2 size or more, except the rows marked
"product shape", which are the sizes the issue names (latency matters there, not bandwidth).
"""
from __future__ import annotations

import argparse
import csv

import torch
import triton
import triton.testing

from fastattr.core.quadrature import quadrature
from fastattr.kernels import interpolate as ig_ops
from fastattr.kernels import relevance as rel_ops
from fastattr.kernels._triton import ieee_float32_matmul

ROWS: list[dict] = []


def bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def close(got: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> float:
    """Relative (Frobenius) error; raise before anything is timed when it is above ``tol``."""
    error = ((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
    if not error <= tol:
        raise AssertionError(f"{what}: relative error {error:.2e} > {tol:.0e}; not timing a wrong kernel")
    return error


def record(op: str, shape: str, dtype: torch.dtype, nbytes: float, flops: float, t_torch: float, t_triton: float,
           error: float, copy_gbps: float, note: str = "") -> None:
    row = {"operation": op, "shape": shape, "dtype": str(dtype).replace("torch.", ""), "MB": nbytes / 1e6,
           "torch_ms": t_torch, "triton_ms": t_triton, "speedup": t_torch / t_triton,
           "triton_GBps": nbytes / t_triton / 1e6, "of_copy_bw": nbytes / t_triton / 1e6 / copy_gbps,
           "triton_TFLOPs": flops / t_triton / 1e9 if flops else float("nan"),
           "floor_ms": nbytes / copy_gbps / 1e6, "rel_err": error, "note": note}
    ROWS.append(row)
    print(f"| {op} | {shape} | {row['dtype']} | {row['MB']:.0f} | {t_torch:.3f} | {t_triton:.3f} | "
          f"{row['speedup']:.2f}x | {row['triton_GBps']:.0f} | {row['of_copy_bw']:.0%} | "
          f"{row['floor_ms']:.3f} | {error:.1e} | {note} |", flush=True)


def maps(batch: int, heads: int, n: int, dtype: torch.dtype, layers: int = 1):
    out = []
    for _ in range(layers):
        attn = torch.rand(batch, heads, n, n, device="cuda").softmax(-1)
        out.append((attn.to(dtype), torch.randn(batch, heads, n, n, device="cuda").to(dtype)))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--csv", help="write every row here")
    args = parser.parse_args(argv)
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)

    src = torch.randn(1 << 28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    copy_gbps = 2 * src.numel() * 4 / bench_ms(lambda: dst.copy_(src)) / 1e6
    a = torch.randn(4, 2048, 2048, device="cuda")
    with ieee_float32_matmul():
        gemm_ms = bench_ms(lambda: torch.baddbmm(a, a, a))
    cublas_tflops = 2 * 4 * 2048**3 / gemm_ms / 1e9
    del src, dst, a
    print(f"device {torch.cuda.get_device_name()} ({props.multi_processor_count} SMs, L2 {l2 / 2**20:.0f} MiB), "
          f"torch {torch.__version__}, triton {triton.__version__}")
    print(f"measured ceilings: device-to-device copy {copy_gbps:.0f} GB/s (read + write); cuBLAS IEEE float32 "
          f"baddbmm [4, 2048, 2048] {cublas_tflops:.1f} TFLOP/s")
    print("| operation | shape | dtype | MB moved | torch ms | triton ms | speedup | triton GB/s | of copy bw | "
          "floor ms | rel err | note |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")

    alphas, weights = quadrature("uniform", 50)
    for batch, n, d, note in ((32, 100, 128, "product shape"), (256, 100, 128, "")):
        rows = batch * len(alphas)
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(batch, n, d, device="cuda").to(dtype)
            b = torch.randn(batch, n, d, device="cuda").to(dtype)
            out = torch.full((rows, n, d), float("nan"), device="cuda", dtype=dtype)
            ref = ig_ops.interpolate_torch(x.float(), b.float(), alphas, 0, rows)
            err = close(ig_ops.interpolate_triton(x, b, alphas, 0, rows, out=out), ref, 1e-6 if dtype == torch.float32
                        else 1e-2, "IG path construction")
            nbytes = (2 * x.numel() + rows * n * d) * x.element_size()
            record("IG path construction (51 points)", f"B={batch} N={n} D={d}", dtype, nbytes, 0,
                   bench_ms(lambda: ig_ops.interpolate_torch(x, b, alphas, 0, rows)),
                   bench_ms(lambda: ig_ops.interpolate_triton(x, b, alphas, 0, rows, out=out)), err, copy_gbps, note)
            grads = torch.randn(rows, n, d, device="cuda").to(dtype)
            acc_ref = torch.zeros(batch, n, d, device="cuda")
            acc = torch.zeros(batch, n, d, device="cuda")
            ig_ops.accumulate_torch(acc_ref, grads.float(), weights, 0)
            ig_ops.accumulate_triton(acc, grads, weights, 0)
            err = close(acc, acc_ref, 1e-5, "IG gradient reduction")
            nbytes = grads.numel() * grads.element_size() + 2 * acc.numel() * 4
            record("IG gradient reduction (51 points)", f"B={batch} N={n} D={d}", dtype, nbytes, 0,
                   bench_ms(lambda: ig_ops.accumulate_torch(acc_ref, grads, weights, 0)),
                   bench_ms(lambda: ig_ops.accumulate_triton(acc, grads, weights, 0)), err, copy_gbps, note)
            del out, grads
        torch.cuda.empty_cache()

    row_shapes = [(4, 4, 128, 6, "product shape"), (4, 4, 512, 6, "product shape"), (4, 4, 2048, 6, "product shape"),
                  (32, 4, 100, 6, "product shape"), (256, 4, 100, 6, ""), (16, 4, 1024, 6, "")]
    if args.quick:
        row_shapes = row_shapes[2:4]
    for batch, heads, n, layers, note in row_shapes:
        for dtype in (torch.float32, torch.bfloat16):
            stack = maps(batch, heads, n, dtype, layers)
            v0 = torch.nn.functional.one_hot(torch.zeros(batch, dtype=torch.long, device="cuda"), n).float()

            def push(step, stack=stack, v0=v0):
                v = v0
                for attn, grad in reversed(stack):
                    v = step(v, attn, grad)
                return v
            ref = push(lambda v, a, g: rel_ops.row_step_torch(v, a.float(), g.float()))
            err = close(push(rel_ops.row_step_triton), ref, 1e-5 if dtype == torch.float32 else 1e-2, "row path")
            nbytes = 2 * layers * batch * heads * n * n * stack[0][0].element_size()
            record(f"Chefer row path, {layers} layers", f"B={batch} H={heads} N={n}", dtype, nbytes, 0,
                   bench_ms(lambda: push(rel_ops.row_step_torch)), bench_ms(lambda: push(rel_ops.row_step_triton)),
                   err, copy_gbps, note + (" (fits in L2)" if nbytes < 4 * l2 else ""))
            del stack
        torch.cuda.empty_cache()

    for batch, heads, n, note in ((4, 4, 2048, "product shape"), (32, 4, 100, "product shape"), (4, 4, 512, "")):
        for dtype in (torch.float32, torch.bfloat16):
            (attn, grad), = maps(batch, heads, n, dtype)
            R = torch.randn(batch, n, n, device="cuda")
            with ieee_float32_matmul():
                ref = rel_ops.full_step_torch(R.double(), attn.double(), grad.double())
            err = close(rel_ops.full_step_triton(R, attn, grad), ref, 1e-5 if dtype == torch.float32 else 1e-2,
                        "full path")
            nbytes = 2 * attn.numel() * attn.element_size() + 2 * R.numel() * 4
            flops = 2 * batch * n**3
            t_triton = bench_ms(lambda: rel_ops.full_step_triton(R, attn, grad))
            with ieee_float32_matmul():
                t_torch = bench_ms(lambda: rel_ops.full_step_torch(R, attn, grad))
            record("Chefer full path, one layer", f"B={batch} H={heads} N={n}", dtype, nbytes, flops, t_torch,
                   t_triton, err, copy_gbps, note + f"; {flops / t_triton / 1e9:.1f} TFLOP/s vs cuBLAS "
                   f"{cublas_tflops:.1f}")
            cam_ref = rel_ops.cam_torch(attn, grad)
            err = close(rel_ops.cam_triton(attn, grad), cam_ref, 1e-6 if dtype == torch.float32 else 1e-2,
                        "head average")
            record("Chefer head average (cam)", f"B={batch} H={heads} N={n}", dtype,
                   2 * attn.numel() * attn.element_size() + cam_ref.numel() * 4, 0,
                   bench_ms(lambda: rel_ops.cam_torch(attn, grad)), bench_ms(lambda: rel_ops.cam_triton(attn, grad)),
                   err, copy_gbps, note)
            del attn, grad, R
        torch.cuda.empty_cache()
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(ROWS[0]))
            writer.writeheader()
            writer.writerows(ROWS)


if __name__ == "__main__":
    main()
