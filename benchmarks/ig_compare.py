"""Side-by-side IG timing: fastattr vs PyHealth's step loop vs Captum, plus the floor.

The floor is one forward and input-gradient backward of the whole (steps + 1) x batch at once,
timed alone: what IG cannot go below without changing the model. Every method's attributions are
checked against each other before anything is timed.

    python -m benchmarks.ig_compare --layers 2 --heads 4 --dim 64 --length 40 --batch 16 --steps 50

Runs against PyHealth 2.1.0 when it imports (tests/pyhealth_env.sh builds an environment with it).
Where it does not (the GPU machines have no package registry, and PyHealth's imports are far larger
than what can be carried there), the baseline is the stand-in ``fastattr.loop``: PyHealth's step
loop restated (one forward and one full backward, parameter gradients included, per path point) on
fastattr's own Transformer; the output says which ran. Captum is optional.
"""
from __future__ import annotations

import argparse
import platform

import torch

import fastattr
from benchmarks.timing import table
from fastattr.demo.bench import build_model, captum_ig, pyhealth_available
from fastattr.demo.timing import time_interleaved
from fastattr.loop import step_loop_integrated_gradients


def floor_fn(model, data, steps):
    """One forward + input-gradient backward of all (steps + 1) x batch rows."""
    codes = data["codes"]
    emb = model.get_embedding_model()({"codes": codes})["codes"].detach()
    rows = emb.repeat(steps + 1, 1, 1).requires_grad_(True)
    mask = (codes != 0).int().repeat(steps + 1, 1)

    def run():
        out = model.forward_from_embedding(codes=(rows, mask))["logit"]
        torch.autograd.grad(out[:, 0].sum(), rows)
    return run




def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--length", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    use_pyhealth = pyhealth_available()
    model, data = build_model(args.length, args.batch, args.layers, args.heads, args.dim, args.device,
                              use_pyhealth=use_pyhealth)
    ours = fastattr.IntegratedGradients(model)
    if use_pyhealth:
        from pyhealth.interpret.methods import IntegratedGradients as PyHealthIG

        theirs, base = PyHealthIG(model), "pyhealth"
        run_base = lambda: theirs.attribute(steps=args.steps, **data)  # noqa: E731
    else:
        base = "pyhealth-loop stand-in"
        run_base = lambda: step_loop_integrated_gradients(model, steps=args.steps, **data)  # noqa: E731
    ref = run_base()["codes"].detach()
    got = ours.attribute(steps=args.steps, **data)["codes"]
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert err <= 1e-5, f"fastattr differs from {base}: relative error {err:.2e}"
    fns = {
        base: run_base,
        "fastattr": lambda: ours.attribute(steps=args.steps, **data),
        "floor": floor_fn(model, data, args.steps),
    }
    ours.attribute(steps=args.steps, **data)
    chunk = ours.last_internal_batch_size
    try:
        run_captum = captum_ig(model, data, args.steps, chunk)
    except ImportError:
        run_captum = None
    if run_captum is not None:
        # Captum's trapezoid weights over n points are 1/n with halved ends (they sum to (n-1)/n);
        # fastattr's are 1/(n-1) with halved ends, so the two differ by exactly that factor.
        trap = ours.attribute(steps=args.steps, method="riemann_trapezoid", **data)["codes"]
        trap = trap * (args.steps / (args.steps + 1))
        cap = run_captum()
        cerr = ((cap - trap).abs().max() / trap.abs().max()).item()
        assert cerr <= 1e-4, f"Captum differs from fastattr's trapezoid rule: relative error {cerr:.2e}"
        fns["captum"] = run_captum
    times = time_interleaved(fns, args.repeats, args.device)
    print(f"device={args.device} ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; Transformer {args.layers} layers, {args.heads} heads, dim {args.dim}, "
          f"{args.length} codes, batch {args.batch}, steps {args.steps}; fastattr chunk {chunk} rows; "
          f"baseline {base} ({'PyHealth 2.1.0' if use_pyhealth else 'fastattr.loop on fastattr.TransformerClassifier'}"
          "), "
          f"parity {err:.1e}; {args.repeats} interleaved repeats")
    table(times, base)


if __name__ == "__main__":
    main()
