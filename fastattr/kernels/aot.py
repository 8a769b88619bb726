"""Ahead-of-time check of every Triton kernel specialisation, for real GPU targets, without a GPU.

    python -m fastattr.kernels.aot [--arch 90 80] [--full] [--json report.json]

The real launchers are called with ``meta`` tensors of the product shapes; each launch is caught
before it reaches a device, every autotune configuration that survives pruning is expanded, and
each distinct specialisation is compiled for ``sm_<arch>`` by Triton's NVIDIA backend, whose
bundled ``ptxas -v`` reports registers and spills. A launch fails the check when it does not
compile, spills, has a grid CUDA rejects (x > 2^31 - 1, y or z > 65,535) or, at a product shape,
gives fewer than two blocks per SM of an H100 (132 SMs). ``--full`` adds odd sizes, all dtypes
on every shape and the large-indexing case. Exit status 1 on any failure.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ._triton import MAX_GRID_X, MAX_GRID_YZ, MIN_WAVES, TARGET_SMS, interpreting, triton

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Launches exempt from the waves rule: the row path's epilogue, which sums partials of at most an
# eighth of the bytes the main kernel reads (slices hold >= 8 source rows), far less at large N.
EPILOGUES = {"_row_combine_kernel"}


def backend_missing() -> str | None:
    """Why the check cannot run here (no Triton, or no NVIDIA backend in it), else None."""
    if triton is None:
        return "triton is not installed"
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except Exception as exc:  # the wheel may ship without the NVIDIA backend
        return f"Triton's NVIDIA backend is not importable ({type(exc).__name__}: {exc})"
    return None


@dataclass
class Launch:
    label: str
    product: bool
    kernel: object
    args: tuple
    kwargs: dict
    grid: tuple[int, int, int] = (1, 1, 1)


@dataclass
class Compiled:
    key: str
    arch: int
    error: str | None = None
    registers: int = 0
    spilled_bytes: int = 0
    stack_bytes: int = 0
    shared_bytes: int = 0
    warps: int = 0
    notes: str = ""


@dataclass
class Report:
    compiled: list[Compiled] = field(default_factory=list)
    launches: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def _meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(*shape, device="meta", dtype=dtype)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def cases(full: bool) -> Iterator[tuple[str, bool, Callable[[], object]]]:
    """``(label, is_product_shape, call)`` for every launcher call the check covers."""
    from . import interpolate as ig
    from . import relevance as rel

    for dtype in DTYPES:
        n = _name(dtype)
        # IG product shape: batch 32, 100 codes, dim 128, 51 path points. Chunks as the core runs
        # them (a one-point probe, then the rest) and at an odd offset: offsets must not
        # specialise, so every chunk of a dtype shares one compiled kernel.
        x, acc, alphas = _meta(32, 100, 128, dtype=dtype), _meta(32, 100, 128), _meta(51, dtype=torch.float64)
        for start, rows in ((0, 32), (32, 1600), (37, 515)):
            yield (f"IG interpolate {n} rows [{start}, {start + rows})", True,
                   lambda x=x, al=alphas, s=start, r=rows: ig.interpolate_triton(x, x, al, s, r))
            yield (f"IG accumulate {n} rows [{start}, {start + rows})", True,
                   lambda g=_meta(rows, 100, 128, dtype=dtype), c=acc, al=alphas, s=start:
                   ig.accumulate_triton(c, g, al, s))
        for summed in (True, False):
            yield (f"IG finalize {n} sum_last={summed}", True,
                   lambda x=x, c=acc, s=summed: ig.finalize_triton(x, x, c, 51.0, s))
        # steps="auto": a round's listed rows (sample, point) over the same batch
        listed, points = _meta(600, dtype=torch.int64), _meta(600, dtype=torch.float64)
        yield (f"IG interpolate_rows {n} 600 rows", True,
               lambda x=x, i=listed, al=points: ig.interpolate_rows_triton(x, x, i, al))
        for summed in (True, False):
            yield (f"IG density {n} 600 rows sum_last={summed}", True,
                   lambda x=x, i=listed, g=_meta(600, 100, 128, dtype=dtype), s=summed:
                   ig.density_triton(x, x, i, g, s))
        shapes = [(4, 4, 128), (4, 4, 512), (4, 4, 2048), (32, 4, 100)]
        for batch, heads, tokens in shapes:
            maps = _meta(batch, heads, tokens, tokens, dtype=dtype)
            label = f"{n} B={batch} H={heads} N={tokens}"
            yield f"Chefer row {label}", True, lambda a=maps, v=_meta(batch, tokens): rel.row_step_triton(v, a, a)
            yield (f"Chefer full {label}", True,
                   lambda a=maps, R=_meta(batch, tokens, tokens): rel.full_step_triton(R, a, a))
        if full or dtype == torch.float32:
            # any N: lengths Triton does not specialise on, and tiny maps
            for tokens in (1, 11, 17, 63, 130):
                maps = _meta(2, 3, tokens, tokens, dtype=dtype)
                yield (f"Chefer row {n} N={tokens}", False,
                       lambda a=maps, v=_meta(2, tokens): rel.row_step_triton(v, a, a))
                yield (f"Chefer full {n} N={tokens}", False,
                       lambda a=maps, R=_meta(2, tokens, tokens): rel.full_step_triton(R, a, a))
            for batch, tokens, dim in ((1, 1, 1), (3, 17, 5), (3, 63, 130)):
                x, acc = _meta(batch, tokens, dim, dtype=dtype), _meta(batch, tokens, dim)
                yield (f"IG kernels {n} {batch}x{tokens}x{dim}", False, lambda x=x, acc=acc, b=batch, t=tokens, d=dim: (
                    ig.interpolate_triton(x, x, _meta(8, dtype=torch.float64), 3, 5),
                    ig.accumulate_triton(acc, _meta(5, t, d, dtype=x.dtype), _meta(8), 3),
                    ig.finalize_triton(x, x, acc, 8.0, True),
                    ig.interpolate_rows_triton(x, x, _meta(7, dtype=torch.int64), _meta(7, dtype=torch.float64)),
                    ig.density_triton(x, x, _meta(7, dtype=torch.int64), _meta(7, t, d, dtype=x.dtype), True),
                    ig.density_triton(x, x, _meta(7, dtype=torch.int64), _meta(7, t, d, dtype=x.dtype), False)))
    if full:
        big = _meta(1, 1 << 15, (1 << 16) + 3, dtype=torch.float16)  # 2^31 + elements in one sample
        yield "IG interpolate float16 width > 2^31", False, lambda: ig.interpolate_triton(
            big, big, _meta(2, dtype=torch.float64), 1, 1)


def collect(full: bool) -> list[Launch]:
    """Run the launchers on meta tensors and record every kernel launch they make."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    current: list[tuple[str, bool]] = []

    def record(self, *args, grid, warmup, **kwargs):
        label, product = current[-1]
        launches.append(Launch(label, product, self, args, kwargs, grid))

    def every_config(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args, strict=False))
        configs = self.prune_configs(kwargs) if len(self.configs) > 1 else self.configs
        for config in configs:
            self.fn.run(*args, **kwargs, **config.all_kwargs())
        self.nargs = None

    saved = JITFunction.run, Autotuner.run
    JITFunction.run, Autotuner.run = record, every_config
    try:
        for label, product, call in cases(full):
            current.append((label, product))
            call()
    finally:
        JITFunction.run, Autotuner.run = saved
    return launches


def _ptxas_usage(ptx: str, arch: int) -> dict[str, int]:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        with open(f"{tmp}/kernel.ptx", "w") as fh:
            fh.write(ptx)
        log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}",
                              f"{tmp}/kernel.ptx", "-o", f"{tmp}/kernel.o"],
                             capture_output=True, text=True, check=True).stderr

    def number(pattern: str) -> int:
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0
    return {"registers": number(r"Used (\d+) registers"),
            "spilled_bytes": number(r"(\d+) bytes spill stores") + number(r"(\d+) bytes spill loads"),
            "stack_bytes": number(r"(\d+) bytes stack frame")}


def _notes(ptx: str) -> str:
    widths = sorted(set(re.findall(r"ld\.global[.\w:]*?\.v(\d)\.", ptx)))
    loads = "vector loads v" + "/v".join(widths) if widths else "scalar loads only"
    divisions = len(re.findall(r"\b(?:div|rem)\.[su]64\b", ptx))
    return f"{loads}, {divisions} 64-bit div/rem" + (", cp.async" if "cp.async" in ptx else "")


_PENDING: list[tuple[int, "Launch", dict]] = []


def _compile_one(index: int) -> Compiled:
    """Compile one pending specialisation (run in a forked worker: the list is inherited)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    arch, launch, packed = _PENDING[index]
    result = Compiled(key=packed["key"], arch=arch)
    try:
        kernel = triton.compile(ASTSource(launch.kernel, packed["signature"], packed["constexprs"], packed["attrs"]),
                                target=GPUTarget("cuda", arch, 32), options=packed["options"])
        result.__dict__.update(_ptxas_usage(kernel.asm["ptx"], arch))
        result.shared_bytes, result.warps = kernel.metadata.shared, kernel.metadata.num_warps
        result.notes = _notes(kernel.asm["ptx"])
    except Exception as exc:  # reported, not raised: one broken kernel must not hide others
        result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
    return result


def check(arches: list[int], full: bool = False, compile_kernels: bool = True, workers: int = 2) -> Report:
    """Check every launch's grid and, with ``compile_kernels``, compile every specialisation the
    launchers produce for each arch (``workers`` processes)."""
    import multiprocessing

    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    report = Report()
    launches = collect(full)
    _PENDING.clear()
    for arch in arches:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        seen: set[str] = set()
        offsets: dict[tuple[str, str], set[str]] = {}
        for launch in launches:
            fn = launch.kernel
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            bound, specialization, options = binder(*launch.args, **launch.kwargs)
            opts, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, specialization, options)
            key = f"{fn.__name__} {specialization} warps={opts.num_warps} stages={opts.num_stages}"
            if key not in seen:
                seen.add(key)
                _PENDING.append((arch, launch, dict(key=key, signature=signature, constexprs=constexprs,
                                                    attrs=attrs, options=opts.__dict__)))
            grid = launch.grid(bound) if callable(launch.grid) else launch.grid
            grid = tuple(grid) + (1,) * (3 - len(grid))
            blocks = grid[0] * grid[1] * grid[2]
            if grid[0] > MAX_GRID_X or grid[1] > MAX_GRID_YZ or grid[2] > MAX_GRID_YZ:
                report.failures.append(f"sm_{arch} {launch.label}: grid {grid} exceeds CUDA's limits")
            if launch.product and fn.__name__ not in EPILOGUES and blocks < MIN_WAVES * TARGET_SMS:
                report.failures.append(f"sm_{arch} {launch.label}: {fn.__name__} launches {blocks} blocks, fewer "
                                       f"than {MIN_WAVES} per SM of a {TARGET_SMS}-SM H100")
            if launch.label.startswith("IG") and "rows [" in launch.label:
                offsets.setdefault((" ".join(launch.label.split()[:3]), fn.__name__), set()).add(key)
            report.launches.append({"arch": arch, "launch": launch.label, "kernel": fn.__name__, "grid": grid,
                                    "blocks": blocks, "config": {k: v for k, v in launch.kwargs.items()
                                                                 if k.isupper() or k.startswith("num_")}})
        for (label, name), keys in offsets.items():
            if len(keys) > 1:
                report.failures.append(f"sm_{arch} {label}: chunk offsets produce {len(keys)} specialisations of "
                                       f"{name} (recompiles)")
    if compile_kernels:
        if workers > 1:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                report.compiled = pool.map(_compile_one, range(len(_PENDING)), chunksize=1)
        else:
            report.compiled = [_compile_one(i) for i in range(len(_PENDING))]
        for c in report.compiled:
            if c.error:
                report.failures.append(f"sm_{c.arch} {c.key}: does not compile: {c.error}")
            elif c.spilled_bytes:
                report.failures.append(f"sm_{c.arch} {c.key}: spills {c.spilled_bytes} bytes")
    _PENDING.clear()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--full", action="store_true", help="odd sizes in every dtype, large indexing")
    parser.add_argument("--no-compile", action="store_true", help="grids only (needs no NVIDIA backend)")
    parser.add_argument("--workers", type=int, default=2, help="compile processes")
    parser.add_argument("--json", help="write the whole report here")
    args = parser.parse_args(argv)
    if triton is None:
        print("cannot check: triton is not installed")
        return 2
    if interpreting():
        print("cannot check: TRITON_INTERPRET=1 is set, so the kernels were built for the interpreter; "
              "run without it")
        return 2
    missing = None if args.no_compile else backend_missing()
    if missing:
        print(f"cannot check: {missing}")
        return 2
    report = check(args.arch, args.full, compile_kernels=not args.no_compile, workers=args.workers)
    for c in report.compiled:
        status = "FAIL" if c.error or c.spilled_bytes else "ok  "
        detail = c.error or (f"regs={c.registers} spill={c.spilled_bytes}B stack={c.stack_bytes}B "
                             f"shared={c.shared_bytes}B warps={c.warps} | {c.notes}")
        print(f"{status} sm_{c.arch} {c.key}: {detail}")
    fewest: dict[tuple[int, str, str], dict] = {}
    for launch in report.launches:
        k = (launch["arch"], launch["launch"], launch["kernel"])
        if k not in fewest or launch["blocks"] < fewest[k]["blocks"]:
            fewest[k] = launch
    for (arch, label, kernel), launch in fewest.items():
        print(f"grid sm_{arch} {label} {kernel}: {launch['grid']} = {launch['blocks']} blocks "
              f"({launch['blocks'] / TARGET_SMS:.1f} per SM)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"compiled": [c.__dict__ for c in report.compiled], "launches": report.launches,
                       "failures": report.failures}, fh, indent=1)
    for failure in report.failures:
        print("FAIL", failure)
    print(f"{len(report.compiled)} specialisations compiled for sm_{'/sm_'.join(map(str, args.arch))}, "
          f"{len(report.launches)} launches checked, {len(report.failures)} failure(s)")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
