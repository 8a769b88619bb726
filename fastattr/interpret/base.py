"""The interpreter contract: what every fastattr interpreter is and keeps.

:class:`Interpreter` holds what IG and Chefer share and what the cohort runner and the evaluator
rely on: the constructor's checks (the model protocol, backend, length packing, precision), the
per-call resolution of those options, the last call's predictions and length groups, and the
length-grouped execution (:class:`fastattr.interpret.lengths.LengthGroups`) with its cached
padding verdicts. An interpreter implements ``attribute(**batch)``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from fastattr.core.checks import check_backend_name, check_pack_lengths, check_precision, warn_renamed_target
from fastattr.interpret.features import FeatureBatch, model_device, require_feature_protocol, require_methods
from fastattr.interpret.lengths import LengthGroups
from fastattr.interpret.outputs import logits_of, reported_probabilities


@runtime_checkable
class Attributor(Protocol):
    """What the cohort runner and the evaluator need of any interpreter (fastattr's, or PyHealth's
    own DeepLift, GIM, AttentionRollout...): its model and ``attribute(**batch)``."""

    model: Any

    def attribute(self, **batch: Any) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class CallOptions:
    """One call's options: the constructor's defaults where the call gives ``None``, checked."""

    backend: str | None
    pack_lengths: bool | str
    precision: str


class Interpreter:
    """Base of fastattr's interpreters.

    Args:
        model: a model following the PyHealth protocol; it is put in eval mode.
        methods: the protocol methods this interpreter calls (checked, named when missing).
        group_method: which measured per-group cost its length groups use (``fastattr.core.packing``).
        compared: what its padding check compares, for the messages.
        backend, pack_lengths, precision: the defaults of every call (see the subclasses).
    """

    def __init__(self, model: torch.nn.Module, methods: Iterable[str], *, group_method: str, compared: str,
                 backend: str | None = None, pack_lengths: bool | str = "auto", precision: str = "fp32") -> None:
        purpose = type(self).__name__
        require_feature_protocol(model, purpose)
        require_methods(model, methods, purpose)
        check_backend_name(backend)
        check_pack_lengths(pack_lengths)
        check_precision(precision)
        self.model = model
        self.backend, self.pack_lengths, self.precision = backend, pack_lengths, precision
        #: ``(probabilities [B, C], targets [B])`` of the last call's forward, for the cohort runner
        self.last_predictions: tuple[torch.Tensor, torch.Tensor] | None = None
        #: whether ``last_predictions`` hold the model's ``y_prob`` from a float32 forward of the batch as
        #: the caller gave it (the evaluator then needs no forward of its own)
        self.last_predictions_as_given = False
        #: the float32 logits ``[B, C]`` of the forward that gave ``last_predictions`` (the evaluator's
        #: padding check compares them when they are the batch's as given)
        self.last_logits: torch.Tensor | None = None
        #: length groups of the last call: ``[(samples, padded sizes or None for the batch as given), ...]``
        self.last_groups: list[tuple[int, list[int] | None]] = []
        self._lengths = LengthGroups(model, group_method, compared)
        model.eval()

    def options(self, backend: str | None = None, pack_lengths: bool | str | None = None,
                precision: str | None = None) -> CallOptions:
        """This call's options: the constructor's where ``None``, checked."""
        pack = self.pack_lengths if pack_lengths is None else pack_lengths
        mode = self.precision if precision is None else precision
        check_backend_name(backend)
        check_pack_lengths(pack)
        check_precision(mode)
        return CallOptions(backend if backend is not None else self.backend, pack, mode)

    def begin(self, batch: Mapping[str, Any], backend: str | None, pack_lengths: bool | str | None,
              precision: str | None) -> tuple[torch.device, CallOptions]:
        """What every ``attribute`` call starts with: PyHealth 2.0's renamed keyword warned about, the
        model's device, and this call's options."""
        warn_renamed_target(batch, self.model.feature_keys)
        return model_device(self.model), self.options(backend, pack_lengths, precision)

    def forward_as_given(self, features: FeatureBatch,
                         choose: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's own float32 no-grad forward (PyHealth's masks appended): ``(logits, targets)``,
        ``targets = choose(logits)``; records ``last_predictions``, ``last_logits`` and whether the
        predictions are the model's ``y_prob`` of the batch as the caller gave it."""
        with torch.no_grad():
            out = self.model.forward(**features.call())
        logits = logits_of(out)
        targets = choose(logits)
        prob, given = reported_probabilities(out, logits)
        self.last_predictions_as_given = given and not features.appended
        self.last_predictions, self.last_logits = (prob, targets), logits.detach().float()
        return logits, targets

    def attribute(self, **batch: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __call__(self, **batch: Any) -> dict[str, torch.Tensor]:
        return self.attribute(**batch)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={type(self.model).__name__})"
