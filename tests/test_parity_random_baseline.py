"""fastattr's RandomBaseline against the real PyHealth 2.1.0 RandomBaseline: the same draws bit for bit.

Every protocol model of the parity tier (Transformer flat and nested, MLP with token + tensor features and a
tensor alone, StageNet and StageAttentionNet tuples, and RNN: RandomBaseline needs nothing of a model) with
each distribution and several seeds; a batch of one and one patient 5x longer than the rest; the caller's
Python / NumPy / torch random states after a seeded call (restored, as PyHealth restores them) and after an
unseeded one (advanced exactly as PyHealth advances torch's); ``__call__``; and PyHealth's ``ValueError`` for an
unknown distribution.
"""
import random

import numpy as np
import pytest
import torch
from test_parity_deeplift import CONFIGS, built, case, with_long_patient

from fastattr.interpret.random_baseline import DISTRIBUTIONS, RandomBaseline

pytestmark = pytest.mark.parity

NAMES = [*CONFIGS, "rnn"]


def model_and_batch(name, batch=None):
    if name == "rnn":
        return built("seq", "RNN", 2, (("embedding_dim", 16), ("hidden_dim", 16)), (), 3)
    return case(name, batch=batch)


def theirs_cls():
    from pyhealth.interpret.methods import RandomBaseline as PyHealthRandomBaseline

    return PyHealthRandomBaseline


def assert_same(ours, theirs):
    assert list(ours) == list(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and ours[key].device == theirs[key].device, key
        assert torch.equal(ours[key], theirs[key]), key


def states():
    return random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()


def assert_states(a, b):
    assert a[0] == b[0] and np.array_equal(a[1], b[1]) and torch.equal(a[2], b[2])


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("name", NAMES)
def test_same_draws(name, distribution):
    model, batch = model_and_batch(name)
    for seed in (42, 0, 12345):
        theirs = theirs_cls()(model, random_seed=seed, distribution=distribution).attribute(**batch)
        ours = RandomBaseline(model, random_seed=seed, distribution=distribution).attribute(**batch)
        assert_same(ours, theirs)


@pytest.mark.parametrize("name", ["transformer-2L2H-binary-nested", "stagenet"])
def test_batch_of_one(name):
    model, batch = model_and_batch(name, batch=1)
    assert_same(RandomBaseline(model, random_seed=3).attribute(**batch),
                theirs_cls()(model, random_seed=3).attribute(**batch))


def test_unequal_lengths():
    model, batch = case("transformer-2L2H-multiclass-seq")
    batch = with_long_patient(batch, "conditions")
    assert_same(RandomBaseline(model, random_seed=5, distribution="normal").attribute(**batch),
                theirs_cls()(model, random_seed=5, distribution="normal").attribute(**batch))


def test_seeded_call_leaves_the_random_states_as_pyhealth_does():
    model, batch = case("mlp-seq+tensor")
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    before = states()
    theirs_cls()(model, random_seed=1).attribute(**batch)
    assert_states(states(), before)
    RandomBaseline(model, random_seed=1).attribute(**batch)
    assert_states(states(), before)


def test_unseeded_call_draws_from_and_advances_torch_like_pyhealth():
    model, batch = case("stageattentionnet")
    torch.manual_seed(11)
    theirs = theirs_cls()(model).attribute(**batch)
    after = states()
    torch.manual_seed(11)
    ours = RandomBaseline(model).attribute(**batch)
    assert_same(ours, theirs)
    assert_states(states(), after)


def test_call_interface():
    model, batch = case("transformer-2L2H-binary-seq")
    assert_same(RandomBaseline(model, random_seed=2)(**batch), theirs_cls()(model, random_seed=2)(**batch))


def test_unknown_distribution_is_refused_like_pyhealth():
    model, _ = case("mlp-seq+tensor")
    with pytest.raises(ValueError):
        theirs_cls()(model, distribution="beta")
    with pytest.raises(ValueError):
        RandomBaseline(model, distribution="beta")
