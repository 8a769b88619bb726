"""pytest-benchmark suite: IG on PyHealth's Transformer (2 layers, 4 heads, dim 64, 40 codes,
batch 16, steps 50), fastattr vs PyHealth's step loop in one run.

    python -m pytest benchmarks/test_bench_ig.py --benchmark-columns=median,min,max,rounds

Run it in the PyHealth environment (tests/pyhealth_env.sh prints its path).
"""
import pytest
import torch

import fastattr
from fastattr.demo.bench import build_model

pytest.importorskip("pyhealth.interpret.methods", reason="needs PyHealth 2.1.0")


@pytest.fixture(scope="module")
def setup():
    return build_model(length=40, batch=16, layers=2, heads=4, dim=64, device="cpu", use_pyhealth=True)


def test_fastattr(benchmark, setup):
    model, data = setup
    ig = fastattr.IntegratedGradients(model)
    benchmark.group = "ig-transformer-2L4H-d64-n40-b16-s50"
    benchmark(lambda: ig.attribute(steps=50, **data))


def test_pyhealth(benchmark, setup):
    from pyhealth.interpret.methods import IntegratedGradients

    model, data = setup
    ig = IntegratedGradients(model)
    benchmark.group = "ig-transformer-2L4H-d64-n40-b16-s50"
    benchmark(lambda: ig.attribute(steps=50, **data))


def test_same_attributions(setup):
    from pyhealth.interpret.methods import IntegratedGradients

    model, data = setup
    ref = IntegratedGradients(model).attribute(steps=50, **data)["codes"].detach()
    got = fastattr.IntegratedGradients(model).attribute(steps=50, **data)["codes"]
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())
