"""Whether a model's output ignores padding: checked on every batch that would run trimmed, never assumed.

Running a sample trimmed to its own length instead of padded to its batch's longest is exact only
for a model whose output ignores padding. That is a property of the model and of the data together:
PyHealth's own Transformer infers its attention mask from the embeddings, so a continuous feature
embedded by a ``Linear`` with a bias turns every padded timestep into an attended one, while its
code features are masked; and a model may attend padding only for some patients. No batch proves it
for the next one, so:

* every batch that would run trimmed is checked on its own samples, no-grad: the model's logits of
  the padded batch against those of the trimmed groups (:func:`trimmed_difference`), or each group's
  logits against one more padding position (:func:`extended_difference`); the batch runs padded when
  they differ by more than :data:`PADDING_RTOL`;
* a model seen to depend on padding is remembered for good, per model and feature layout, by every
  interpreter and the evaluator alike (:func:`known_dependence`): it never runs trimmed again, and the
  user is warned once per model, with the feature whose padding it does not ignore named.

The check costs no-grad forwards only: IG's probe is two padded and two trimmed forwards (against
its 51 forwards and backwards); Chefer pads each group's samples one position further (one forward at
the groups' own widths; the groups' logits are the reference); the evaluator runs the unablated batch
trimmed in its groups (its padded forward is PyHealth's own). benchmarks/padding_check_cost.py
measures what share of each call that is (IG 13.7%, Chefer 27.8%, the evaluator 12.7% on a
long-tailed batch of 32 that trims, benchmarks/RESULTS.md).
:func:`check_padding` is the same test for a user to run up front, on any batch, even one patient.
"""
from __future__ import annotations

import os
import sys
import warnings
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fastattr.interpret.features import FeatureBatch, model_device
from fastattr.interpret.outputs import logits_of

# Largest relative difference (over the logits' largest magnitude, at least 1) that counts as float
# rounding between a trimmed and a padded run. Measured on models that ignore padding (the demo's
# Transformer and MLP, PyHealth's Transformer, StageNet, MLP): <= 2e-6 (benchmarks/RESULTS.md, "The
# padding check"); PyHealth's Transformer with a bias-embedded continuous feature: 1e-2 and more.
PADDING_RTOL = 1e-5

Group = tuple[torch.Tensor, list[int]]
LogitsFn = Callable[[FeatureBatch], torch.Tensor]


def layout_key(features: FeatureBatch, *extra: Any) -> tuple:
    """What a cached verdict about a model may depend on: each feature's layout, rank and dtype."""
    return tuple((k, features.layouts[k].schema, features.layouts[k].token, features.value(k).dim(),
                  features.value(k).dtype) for k in features.keys) + extra


def relative_difference(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Largest absolute difference over the reference's largest magnitude (at least 1)."""
    reference, other = reference.detach().double(), other.detach().double()
    if reference.shape != other.shape:
        return float("inf")
    if reference.numel() == 0:
        return 0.0
    return float((reference - other).abs().amax() / reference.abs().amax().clamp_min(1.0))


@dataclass(frozen=True)
class PaddingReport:
    """What a padding check found.

    Attributes:
        model: the model's class name.
        difference: the largest relative difference of the logits between the batch as given and
            the same samples trimmed or padded further (0 when nothing could be compared).
        features: the features whose padding changes the logits on their own (empty when it ignores padding).
        compared: how many samples were compared.
    """

    model: str
    difference: float
    features: tuple[str, ...]
    compared: int

    @property
    def ignores_padding(self) -> bool:
        """Whether the logits stayed within :data:`PADDING_RTOL` (float rounding)."""
        return self.difference <= PADDING_RTOL

    def message(self) -> str:
        """The user's warning: what the model does not ignore, and what follows."""
        names = ", ".join(repr(k) for k in self.features) or "its features"
        return (f"{self.model}'s output depends on the padding of {names}: its logits change by up to "
                f"{self.difference:.2e} (relative) when a patient's padding is trimmed or extended. fastattr runs "
                "it on the padded batch as given, as PyHealth does, so its attributions and faithfulness scores "
                "depend on how patients are batched (another batch size, or sorting by length, changes them). "
                "fastattr.check_padding(model, batch) tests a model up front")


# model -> {feature layout: report}: the models seen to depend on padding, shared by every user.
_DEPENDENT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_WARNED: weakref.WeakSet = weakref.WeakSet()


def known_dependence(model: Any, layout: tuple) -> PaddingReport | None:
    """The report of an earlier failed check of ``model`` on this feature ``layout`` (:func:`layout_key`), if any."""
    try:
        return _DEPENDENT.get(model, {}).get(layout)
    except TypeError:  # not weak-referenceable: nothing remembered
        return None


def record_dependence(model: Any, layout: tuple, report: PaddingReport, *, warn: bool = True) -> None:
    """Remember that ``model`` depends on padding for ``layout``; warn once per model (``warn``)."""
    try:
        _DEPENDENT.setdefault(model, {})[layout] = report
        first = model not in _WARNED
        _WARNED.add(model)
    except TypeError:
        first = True
    if warn and first:
        warnings.warn(report.message(), UserWarning, stacklevel=_caller_level())


def _caller_level() -> int:
    """The stack level of the first frame outside fastattr (the user's call), for a warning."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def input_logits(model: Any, part: FeatureBatch, rest: Mapping[str, Any] | None = None) -> torch.Tensor:
    """Float32 no-grad logits of ``part`` as a caller's batch would give it (``rest``: its other entries)."""
    with torch.no_grad():
        return logits_of(model(**(rest or {}), **part.inputs())).float()


def trimmed_difference(logits: LogitsFn, features: FeatureBatch, groups: list[Group],
                       reference: torch.Tensor | None = None) -> float:
    """Worst relative difference between ``logits(features)`` (or ``reference``, its value when
    already computed) and ``logits`` of each group's samples cut to the group's sizes."""
    with torch.no_grad():
        whole = logits(features) if reference is None else reference
        worst = 0.0
        for index, sizes in groups:
            part = logits(features.subset(index, sizes))
            worst = max(worst, relative_difference(whole[index.to(whole.device)], part))
    return worst


def extended_difference(logits: LogitsFn, features: FeatureBatch, groups: list[Group],
                        reference: torch.Tensor | None = None) -> float:
    """Worst relative difference between ``logits`` of each group's samples at the group's sizes
    (``reference``: those logits in batch order, when computed already) and at one more padding
    position along every padded dim: a check of trailing padding that costs a forward at the groups'
    own widths, not at the batch's."""
    worst = 0.0
    with torch.no_grad():
        for index, sizes in groups:
            own = logits(features.subset(index, sizes)) if reference is None else reference[index.to(reference.device)]
            further = logits(features.subset(index, [size + 1 for size in sizes]))
            worst = max(worst, relative_difference(own, further))
    return worst


def feature_differences(logits: LogitsFn, features: FeatureBatch, reference: torch.Tensor | None = None,
                        extra: int | None = None) -> dict[str, float]:
    """Per padded feature, the worst relative difference of the logits when that feature alone is
    padded further by ``extra`` positions along each padded dim (default: as many as it has) or trimmed
    to the batch's longest own length, against the batch as given (``reference``: its logits if known)."""
    lengths = features.lengths()
    own = lengths.amax(dim=0).tolist() if lengths.numel() else []
    changes = (lambda column, size: size + (extra or size), lambda column, size: max(1, min(size, int(own[column]))))
    index = torch.arange(features.size)
    out = {}
    with torch.no_grad():
        whole = logits(features) if reference is None else reference
        for key, span in zip(features.keys, features.padded_spans(), strict=True):
            if span:
                parts = (features.subset(index, resized(features, key, change)) for change in changes)
                out[key] = max(relative_difference(whole, logits(part)) for part in parts)
    return out


def resized(features: FeatureBatch, key: str, change: Callable[[int, int], int]) -> list[int]:
    """The batch's padded sizes with feature ``key``'s columns ``change(column, size)``-d, the others kept."""
    sizes, column = [], 0
    for k, span in zip(features.keys, features.padded_spans(), strict=True):
        for d in range(1, span + 1):
            size = features.value(k).shape[d]
            sizes.append(change(column, size) if k == key else size)
            column += 1
    return sizes


def report_for(model: Any, logits: LogitsFn, features: FeatureBatch, worst: float,
               reference: torch.Tensor | None = None) -> PaddingReport:
    """The report of a failed check (``worst``): each padded feature tried on its own, to name the
    ones whose padding matters (every padded feature when none does alone)."""
    found = tuple(k for k, d in feature_differences(logits, features, reference).items() if d > PADDING_RTOL)
    if not found:
        found = tuple(k for k, span in zip(features.keys, features.padded_spans(), strict=True) if span)
    return PaddingReport(type(model).__name__, worst, found, features.size)


def check_padding(model: torch.nn.Module, batch: Mapping[str, Any], *, extra: int | None = None) -> PaddingReport:
    """Whether ``model``'s logits ignore padding, tested on ``batch`` (any dataloader batch, one patient is enough).

    Each feature with padded positions is padded further by ``extra`` positions along each of its
    padded dims (default: as many as it has), on its own, and every sample is also trimmed to the
    batch's longest own length; the logits are compared with those of the batch as given. A model
    that passes on every batch a user tries may still depend on padding for other data: fastattr's
    interpreters and evaluator check each batch they trim anyway. Raises nothing for a model that
    fails: read :attr:`PaddingReport.ignores_padding` and :attr:`PaddingReport.features`.

    >>> report = fastattr.check_padding(model, next(iter(test_loader)))  # doctest: +SKIP
    >>> report.ignores_padding, report.features                           # doctest: +SKIP
    (False, ('labs',))
    """
    if extra is not None and (not isinstance(extra, int) or isinstance(extra, bool) or extra < 1):
        raise ValueError(f"extra must be a positive number of positions or None; got {extra!r}")
    was_training = model.training
    model.eval()
    features = FeatureBatch.from_batch(model, batch, device=model_device(model))
    rest = {k: v for k, v in batch.items() if k not in features.keys}
    try:
        differences = feature_differences(lambda part: input_logits(model, part, rest), features, extra=extra)
    finally:
        model.train(was_training)
    found = tuple(k for k, d in differences.items() if d > PADDING_RTOL)
    return PaddingReport(type(model).__name__, max(differences.values(), default=0.0), found, features.size)
