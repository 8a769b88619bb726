"""Drop-in replacement for ``pyhealth.interpret.methods.RandomBaseline`` (PyHealth 2.1.0).

Random scores in each raw value's shape: the sanity-check baseline any attribution method should beat.
The draws are PyHealth's for the same ``random_seed``: one ``rand_like`` / ``randn_like`` per feature, in
the batch's key order, on the input's own device, from torch's global generator seeded with
``torch.manual_seed(random_seed)``; the caller's random states (Python's, NumPy's, torch's CPU and
initialised CUDA generators) are put back afterwards, as PyHealth puts them back. With ``random_seed=None``
the draws come from, and advance, torch's global generator. No forward is run.
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from fastattr.interpret.base import Interpreter
from fastattr.interpret.features import FeatureLayout, model_device

DISTRIBUTIONS = ("uniform", "normal", "signed_uniform")
_SEEDS = (-(2 ** 63), 2 ** 64 - 1)  # what torch.manual_seed takes


def check_random_seed(seed: Any) -> None:
    """Raise ``ValueError`` unless ``seed`` is ``None`` or an integer ``torch.manual_seed`` takes."""
    if seed is None:
        return
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) \
            or not _SEEDS[0] <= int(seed) <= _SEEDS[1]:
        raise ValueError(f"random_seed must be None or an integer in [-2**63, 2**64 - 1]; got {seed!r}")


@contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Inside: torch seeded with ``seed`` (all devices, as ``torch.manual_seed`` does); after: Python's,
    NumPy's, torch's CPU and (if initialised) CUDA random states as they were. ``None``: nothing."""
    if seed is None:
        yield
        return
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        torch.manual_seed(int(seed))
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def draw(value: torch.Tensor, distribution: str) -> torch.Tensor:
    """One score per element of ``value``, float32, on ``value``'s device, from the global generator."""
    like = value.float()
    if distribution == "uniform":
        return torch.rand_like(like)
    if distribution == "normal":
        return torch.randn_like(like)
    return torch.rand_like(like) * 2 - 1


class RandomBaseline(Interpreter):
    """Random attributions, PyHealth 2.1.0's ``RandomBaseline`` (its arguments, defaults and draws).

    Args:
        model: a model following the PyHealth protocol (``feature_keys``, ``dataset.input_processors``);
            it is put in eval mode and never run.
        random_seed: seeds each call's draws (the caller's random states are left as they were);
            ``None`` (default) draws from torch's global generator.
        distribution: ``"uniform"`` (default, in [0, 1)), ``"normal"`` (standard normal) or
            ``"signed_uniform"`` (in [-1, 1)).
    """

    def __init__(self, model: torch.nn.Module, random_seed: int | None = None, distribution: str = "uniform") -> None:
        if not isinstance(distribution, str) or distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {', '.join(DISTRIBUTIONS)}; got {distribution!r}")
        check_random_seed(random_seed)
        super().__init__(model, (), group_method="perturbation", compared="logits")
        self.random_seed, self.distribution = random_seed, distribution

    def attribute(self, **batch: Any) -> dict[str, torch.Tensor]:
        """Random scores per feature key of the batch (in the batch's order), each float32 in the raw
        value's shape, on the model's device.

        Args:
            **batch: a dataloader batch; entries that are not feature keys are ignored.
        """
        device = model_device(self.model)
        values = {k: FeatureLayout.of(self.model, k).value(v) for k, v in batch.items() if k in self.model.feature_keys}
        for key, value in values.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"the value of feature {key!r} must be a tensor; got {type(value).__name__}")
        with seeded(self.random_seed):
            return {k: draw(v, self.distribution).to(device) for k, v in values.items()}
