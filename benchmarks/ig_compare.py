"""Side-by-side IG timing: fastattr vs PyHealth's step loop vs Captum, plus the floor.

The floor is one forward and input-gradient backward of the whole (steps + 1) x batch at once,
timed alone: what IG cannot go below without changing the model. Every method's attributions are
checked against each other before anything is timed.

    python benchmarks/ig_compare.py --layers 2 --heads 4 --dim 64 --length 40 --batch 16 --steps 50

Needs PyHealth 2.1.0 (tests/pyhealth_env.sh builds an environment with it); Captum is optional.
"""
from __future__ import annotations

import argparse
import platform
import random

import torch

import fastattr
from timing import interleaved, table


def build(layers: int, heads: int, dim: int, length: int, batch: int, device: str):
    from pyhealth.datasets import create_sample_dataset, get_dataloader
    from pyhealth.models import Transformer

    rng = random.Random(0)
    samples = [{"patient_id": f"p{i}", "visit_id": "v", "label": i % 2,
                "conditions": [f"c{rng.randrange(500)}" for _ in range(length)]} for i in range(max(batch, 8))]
    dataset = create_sample_dataset(samples=samples, input_schema={"conditions": "sequence"},
                                    output_schema={"label": "binary"}, dataset_name="bench")
    torch.manual_seed(0)
    model = Transformer(dataset=dataset, embedding_dim=dim, heads=heads, num_layers=layers).to(device).eval()
    data = next(iter(get_dataloader(dataset, batch_size=batch)))
    return model, {"conditions": data["conditions"].to(device)}


def floor_fn(model, data, steps):
    """One forward + input-gradient backward of all (steps + 1) x batch rows."""
    codes = data["conditions"]
    emb = model.get_embedding_model()({"conditions": codes})["conditions"].detach()
    rows = emb.repeat(steps + 1, 1, 1).requires_grad_(True)
    mask = (codes != 0).int().repeat(steps + 1, 1)

    def run():
        out = model.forward_from_embedding(conditions=(rows, mask))["logit"]
        torch.autograd.grad(out[:, 0].sum(), rows)
    return run


def captum_fn(model, data, steps, chunk):
    from captum.attr import IntegratedGradients as CaptumIG

    codes = data["conditions"]
    embed = model.get_embedding_model()
    x = embed({"conditions": codes})["conditions"].detach()
    b = embed({"conditions": torch.ones_like(codes)})["conditions"].detach()
    mask = (codes != 0).int()
    ig = CaptumIG(lambda e, m: model.forward_from_embedding(conditions=(e, m))["logit"][:, 0])

    def run():
        return ig.attribute(x, baselines=b, additional_forward_args=(mask,), n_steps=steps + 1,
                            method="riemann_trapezoid", internal_batch_size=chunk).sum(-1)
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
    from pyhealth.interpret.methods import IntegratedGradients as PyHealthIG

    model, data = build(args.layers, args.heads, args.dim, args.length, args.batch, args.device)
    ours = fastattr.IntegratedGradients(model)
    theirs = PyHealthIG(model)
    ref = theirs.attribute(steps=args.steps, **data)["conditions"].detach()
    got = ours.attribute(steps=args.steps, **data)["conditions"]
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert err <= 1e-5, f"fastattr differs from PyHealth: relative error {err:.2e}"
    fns = {
        "pyhealth": lambda: theirs.attribute(steps=args.steps, **data),
        "fastattr": lambda: ours.attribute(steps=args.steps, **data),
        "floor": floor_fn(model, data, args.steps),
    }
    chunk = fastattr.integrated.default_internal_batch_size(args.batch, args.steps + 1, torch.device(args.device))
    try:
        run_captum = captum_fn(model, data, args.steps, chunk)
    except ImportError:
        run_captum = None
    if run_captum is not None:
        # Captum's trapezoid weights over n points are 1/n with halved ends (they sum to (n-1)/n);
        # fastattr's are 1/(n-1) with halved ends, so the two differ by exactly that factor.
        trap = ours.attribute(steps=args.steps, method="riemann_trapezoid", **data)["conditions"]
        trap = trap * (args.steps / (args.steps + 1))
        cap = run_captum()
        cerr = ((cap - trap).abs().max() / trap.abs().max()).item()
        assert cerr <= 1e-4, f"Captum differs from fastattr's trapezoid rule: relative error {cerr:.2e}"
        fns["captum"] = run_captum
    times = interleaved(fns, args.repeats, args.device)
    print(f"device={args.device} ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; Transformer {args.layers} layers, {args.heads} heads, dim {args.dim}, "
          f"{args.length} codes, batch {args.batch}, steps {args.steps}; fastattr chunk {chunk} rows; "
          f"parity with PyHealth {err:.1e}; {args.repeats} interleaved repeats")
    table(times, "pyhealth")


if __name__ == "__main__":
    main()
