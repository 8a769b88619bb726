"""fastattr's RandomBaseline against the plain oracle (fastattr.loop.random_baseline.loop_random_baseline:
PyHealth 2.1.0's draws): the same numbers bit for bit for each distribution and seed, in the batch's key
order, shapes of padded, nested and tuple features, a batch of one; the caller's random states left as they
were with a seed, torch's advanced as PyHealth advances it without one; and clear errors for bad options."""
import random

import numpy as np
import pytest
import torch
from conftest import own_model

from fastattr.demo.models import FeatureProcessor, FeatureSpec, MLPClassifier
from fastattr.interpret.random_baseline import DISTRIBUTIONS, RandomBaseline
from fastattr.loop.random_baseline import loop_random_baseline


def assert_same(got, ref):
    assert list(got) == list(ref)
    for key in ref:
        assert got[key].dtype == torch.float32 and torch.equal(got[key], ref[key])


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("seed", [0, 42, -3])
def test_matches_the_oracle(distribution, seed):
    model, batch = own_model("mlp", seed=1)
    got = RandomBaseline(model, random_seed=seed, distribution=distribution).attribute(**batch)
    assert_same(got, loop_random_baseline(model, random_seed=seed, distribution=distribution, **batch))
    assert got["codes"].shape == batch["codes"].shape and got["labs"].shape == batch["labs"].shape


def test_key_order_is_the_batch_order_and_shapes_are_the_values():
    spec = FeatureSpec({"codes": FeatureProcessor(token=True, size=9),
                        "vitals": FeatureProcessor(token=False, size=3, layout=("time", "value")),
                        "visits": FeatureProcessor(token=True, size=9)})
    model = MLPClassifier(spec, dim=4, hidden=4)
    batch = {"visits": torch.randint(0, 9, (1, 3, 4)), "label": torch.zeros(1),
             "vitals": (torch.rand(1, 5), torch.randn(1, 5, 3)), "codes": torch.randint(0, 9, (1, 7))}
    got = RandomBaseline(model, random_seed=5).attribute(**batch)
    assert list(got) == ["visits", "vitals", "codes"]
    assert got["vitals"].shape == (1, 5, 3) and got["visits"].shape == (1, 3, 4)
    assert_same(got, loop_random_baseline(model, random_seed=5, **batch))


def test_random_states_are_left_as_pyhealth_leaves_them():
    model, batch = own_model("mlp", seed=2)
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    first = RandomBaseline(model, random_seed=7).attribute(**batch)
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    assert_same(RandomBaseline(model, random_seed=7).attribute(**batch), first)
    # without a seed: torch's global generator, advanced by the draws, as in PyHealth
    torch.manual_seed(3)
    got = RandomBaseline(model).attribute(**batch)
    after = torch.get_rng_state()
    torch.manual_seed(3)
    assert_same(got, loop_random_baseline(model, **batch))
    assert torch.equal(torch.get_rng_state(), after)


def test_bad_options():
    model, _ = own_model("mlp", seed=3)
    with pytest.raises(ValueError, match="distribution"):
        RandomBaseline(model, distribution="beta")
    for seed in ("1", 1.5, True, 2 ** 64):
        with pytest.raises(ValueError, match="random_seed"):
            RandomBaseline(model, random_seed=seed)
    RandomBaseline(model, random_seed=np.int64(4))
