"""Side-by-side Chefer timing: fastattr vs PyHealth, relevance alone and end to end.

    python -m benchmarks.chefer_compare relevance --batch 4 --heads 2 --tokens 1024 --layers 6
    python -m benchmarks.chefer_compare end2end --layers 6 --heads 4 --dim 32 --tokens 384 --batch 4

"relevance" times the propagation alone on given random maps and gradients: PyHealth's loop
(avg_heads, then R + cam @ R per layer, then row 0) against fastattr's row path and full path.
"end2end" times CheferRelevance.attribute on a PyHealth Transformer when PyHealth 2.1.0 imports,
else on fastattr's own Transformer against ``fastattr.loop.full_chefer_relevance`` (PyHealth's
algorithm restated), and says which ran.
Results are checked equal before timing; repeats are interleaved.
"""
from __future__ import annotations

import argparse

import torch

import fastattr
from benchmarks.timing import table
from fastattr.demo.bench import build_model, pyhealth_available
from fastattr.demo.timing import time_interleaved
from fastattr.loop import full_chefer_relevance, full_relevance


def pyhealth_loop(layers):
    """PyHealth 2.1.0's propagation, then the Transformer's row 0."""
    return full_relevance(layers)[:, 0]


def relevance(args) -> None:
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.heads, args.tokens, args.tokens)
    layers = []
    for _ in range(args.layers):
        attn = torch.rand(shape, generator=g).softmax(-1).to(args.device)
        layers.append((attn, torch.randn(shape, generator=g).to(args.device)))
    rows = torch.zeros(args.batch, dtype=torch.long, device=args.device)
    ref = pyhealth_loop(layers)
    fns = {"pyhealth": lambda: pyhealth_loop(layers)}
    for backend in args.backends:
        got = fastattr.chefer_relevance(layers, rows, backend=backend)
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        assert err <= 1e-5, f"row path ({backend}) differs: {err:.2e}"
        fns[f"fastattr row path ({backend})"] = lambda b=backend: fastattr.chefer_relevance(layers, rows, backend=b)
        if args.full:
            full = fastattr.chefer_relevance(layers, backend=backend)[:, 0]
            assert ((full - ref).abs().max() / ref.abs().max()).item() <= 1e-5
            fns[f"fastattr full path ({backend})"] = lambda b=backend: fastattr.chefer_relevance(layers, backend=b)
    times = time_interleaved(fns, args.repeats, args.device)
    print(f"relevance alone, device={args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}: "
          f"B={args.batch} H={args.heads} N={args.tokens} L={args.layers}, float32, {args.repeats} interleaved repeats")
    table(times, "pyhealth")


def end2end(args) -> None:
    use_pyhealth = pyhealth_available()
    model, batch = build_model(args.tokens, args.batch, args.layers, args.heads, args.dim, args.device, use_pyhealth)
    ours = fastattr.CheferRelevance(model)
    if use_pyhealth:
        from pyhealth.interpret.methods import CheferRelevance as PyHealthChefer

        theirs, base = PyHealthChefer(model), "pyhealth"
        run_base = lambda: theirs.attribute(**batch)  # noqa: E731
    else:
        base = "pyhealth-loop stand-in"
        run_base = lambda: full_chefer_relevance(model, **batch)  # noqa: E731
    ref = run_base()["codes"].detach()
    fns = {base: run_base}
    for backend in args.backends:
        got = ours.attribute(backend=backend, **batch)["codes"]
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        assert err <= 1e-5, f"fastattr ({backend}) differs from {base}: {err:.2e}"
        fns[f"fastattr ({backend})"] = lambda b=backend: ours.attribute(backend=b, **batch)
    embed_params = list(model.get_embedding_model().parameters())

    def floor():
        """The model's forward with attention capture plus the backward that reaches every map."""
        model.set_attention_hooks(True)
        logits = model(**batch)["logit"]
        model.set_attention_hooks(False)
        torch.autograd.grad(logits[:, 0].sum(), embed_params, allow_unused=True)

    fns["floor (model forward + backward)"] = floor
    times = time_interleaved(fns, args.repeats, args.device)
    print(f"CheferRelevance.attribute end to end, device={args.device}, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}: {'PyHealth Transformer' if use_pyhealth else 'fastattr TransformerClassifier'} "
          f"{args.layers} layers, {args.heads} heads, dim {args.dim}, {args.tokens} codes, batch {args.batch}, "
          f"baseline {base}, {args.repeats} interleaved repeats")
    table(times, base)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["relevance", "end2end"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--full", action="store_true", help="also time the full-R path")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", nargs="+", default=None)
    args = parser.parse_args(argv)
    if args.backends is None:
        args.backends = ["torch", "triton"] if args.device.startswith("cuda") else ["torch"]
    (relevance if args.mode == "relevance" else end2end)(args)


if __name__ == "__main__":
    main()
