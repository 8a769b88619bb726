"""The attribution methods of the cohort tools: which interpreter each method name builds and which of
its options the tools pass through, and which methods give a patient values that depend on the rest of
its batch (so a cohort run must keep the loader's batches for them and record how they were cut)."""
from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastattr.interpret.base import Interpreter

# Interpreters whose values for one patient depend on the other patients of its batch and on its padded
# widths, as PyHealth defines them: SHAP's coalitions and LIME's perturbations are drawn once for the
# whole batch over its padded positions (and weighted over them); RandomBaseline draws one tensor of the
# batch's padded shape, so a patient's scores depend on its place in the batch. Matched by class name along
# the class's bases, so PyHealth's own classes count too (its ShapExplainer and LimeExplainer are aliases
# of classes named Shap and Lime).
BATCH_DEPENDENT = frozenset({"ShapExplainer", "LimeExplainer", "RandomBaseline", "Shap", "Lime"})


@dataclass(frozen=True)
class Method:
    """One method of the tools: ``target`` (``"module:Class"``), the constructor keywords it takes from
    the tools (``options``) and the keywords of its ``attribute`` call (``call_options``)."""

    target: str
    options: tuple[str, ...] = ()
    call_options: tuple[str, ...] = ()

    def load(self) -> type:
        """The interpreter class (imported on first use)."""
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)


METHODS: dict[str, Method] = {
    "ig": Method("fastattr:IntegratedGradients", ("steps", "tolerance"), ("precision",)),
    "chefer": Method("fastattr:CheferRelevance", (), ("precision",)),
    "shap": Method("fastattr:ShapExplainer", ("max_coalitions", "random_seed")),
    "lime": Method("fastattr:LimeExplainer", ("n_samples", "random_seed")),
    "deeplift": Method("fastattr:DeepLift"),
    "rollout": Method("fastattr:AttentionRollout"),
    "random": Method("fastattr:RandomBaseline", ("random_seed",)),
    "gim": Method("fastattr:GIM", ("temperature",)),
    "ig-gim": Method("fastattr:IntegratedGradientGIM", ("temperature", "steps", "tolerance"),
                     ("precision",)),
}


def build_interpreter(method: str, model: Any, options: Mapping[str, Any] | None = None
                      ) -> tuple[Any, dict[str, Any]]:
    """``(interpreter, attribute keywords)`` for ``method`` (a key of :data:`METHODS`) on ``model``.

    Args:
        method: the method's name in the tools (``"ig"``, ``"shap"``, ``"ig-gim"``...).
        model: the model to explain.
        options: constructor and call keywords; ``None`` values are left to the method's defaults.
            A keyword the method does not take is refused with ``ValueError`` naming it and the method.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    spec = METHODS[method]
    given = {k: v for k, v in (options or {}).items() if v is not None}
    foreign = sorted(set(given) - set(spec.options) - set(spec.call_options))
    if foreign:
        takes = ", ".join(spec.options + spec.call_options) or "no options"
        raise ValueError(f"method {method!r} does not take {', '.join(foreign)}; it takes {takes}")
    built = spec.load()(model, **{k: v for k, v in given.items() if k in spec.options})
    return built, {k: v for k, v in given.items() if k in spec.call_options}


def batch_dependent(interpreter: Any) -> bool:
    """Whether ``interpreter``'s values for a patient depend on its batch (:data:`BATCH_DEPENDENT`, or
    the interpreter's own ``batch_dependent`` attribute where it declares one)."""
    declared = getattr(interpreter, "batch_dependent", None)
    if isinstance(declared, bool):
        return declared
    return any(cls.__name__ in BATCH_DEPENDENT for cls in type(interpreter).__mro__)


# Settings that choose how the numbers are computed, not which: a resumed run may change them.
EXECUTION_SETTINGS = frozenset({"backend", "pack_lengths"})


def settings(interpreter: Any) -> dict[str, Any]:
    """A fastattr interpreter's constructor settings that are plain values (``max_coalitions``,
    ``random_seed``, ``n_samples``, ``steps``...), read back from the attributes of the same names, less
    :data:`EXECUTION_SETTINGS`: what a resumed run must share with the run it continues. Empty for other
    objects (a wrapper, PyHealth's interpreters)."""
    if not isinstance(interpreter, Interpreter):
        return {}
    try:
        names = list(inspect.signature(type(interpreter).__init__).parameters)[1:]
    except (TypeError, ValueError):
        return {}
    out = {}
    for name in names:
        if name == "model" or name in EXECUTION_SETTINGS or not hasattr(interpreter, name):
            continue
        value = getattr(interpreter, name)
        if value is None or isinstance(value, (bool, int, float, str)):
            out[name] = value
    return out
