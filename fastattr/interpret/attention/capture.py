"""Capturing what Chefer's backward needs from a model, and refusing what an earlier call left.

- :class:`HookedTensors` records the tensors a model registers gradient hooks on during its forward
  (under Chefer's protocol, its attention maps): the backward's natural ends. It wraps
  ``torch.Tensor.register_hook`` only while some thread is inside one, and records only for the
  thread that entered: the riskiest code in fastattr, kept here with its own tests.
- :func:`gradient_sinks` is a forward hook collecting an embedding module's outputs, the fallback
  ends of the backward for a model that keeps its gradients another way.
- :class:`ModuleState` and :class:`OldTensors` find attention gradients that are stale (left by an
  earlier call, not written by this backward) by storage and version counter, without calling any
  model method before the backward.
"""
from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from typing import Any

import torch


def gradient_sinks(sinks: list[torch.Tensor]):
    """A forward hook for the embedding module that collects its floating outputs as the ends of
    Chefer's backward, made to require grad where frozen weights left them outside the graph."""
    def sink(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            if not value.requires_grad:
                value = value.detach().requires_grad_(True)
            sinks.append(value)
        return value

    def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, dict):
            return {k: sink(v) for k, v in output.items()}
        if isinstance(output, (tuple, list)):
            return type(output)(sink(v) for v in output)
        return sink(output)
    return hook


class HookedTensors:
    """While entered, records every tensor the model registers a gradient hook on in this thread:
    under Chefer's protocol, the attention maps whose gradients the model keeps. Those are the
    backward's natural ends: a gradient taken to them computes what the hooks need and nothing
    below (not layer 0's scores and projections, not the embeddings). ``Tensor.register_hook``
    is wrapped only while some thread is inside one (a lock and a count), and records only for
    the thread that entered."""

    _lock = threading.Lock()
    _users = 0
    _original: Any = None  # what Tensor.register_hook was when first wrapped; kept, so a call that
    _local = threading.local()  # began in the wrapper just before it was taken out still completes

    def __enter__(self) -> list[torch.Tensor]:
        cls = type(self)
        with cls._lock:
            if cls._users == 0:
                if torch.Tensor.register_hook is not _recording_register_hook:
                    cls._original = torch.Tensor.register_hook
                torch.Tensor.register_hook = _recording_register_hook
            cls._users += 1
        self.outer = getattr(cls._local, "found", None)
        cls._local.found = self.found = []
        return self.found

    def __exit__(self, *exc: Any) -> None:
        cls = type(self)
        cls._local.found = self.outer
        with cls._lock:
            cls._users -= 1
            if cls._users == 0:
                torch.Tensor.register_hook = cls._original


def _recording_register_hook(tensor: torch.Tensor, hook: Any) -> Any:
    found = getattr(HookedTensors._local, "found", None)
    if found is not None:
        found.append(tensor)
    return HookedTensors._original(tensor, hook)


# What every nn.Module holds itself (parameter, buffer, submodule and hook dicts): never a model's own state.
_TORCH_ATTRIBUTES = frozenset(vars(torch.nn.Module()))


_HOLDERS = (torch.Tensor, list, tuple, dict, type(None))


class ModuleState:
    """The model's modules with the names of the attributes they set themselves that can hold a
    tensor (a tensor, a container or ``None`` now: where attention hooks keep maps and gradients;
    numbers and strings are configuration), found once per module and again when its attributes
    change in number."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.modules = [[m, -1, ()] for m in model.modules()]

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor a module holds as its own attribute, one level into lists, tuples and dicts."""
        for entry in self.modules:
            attributes = entry[0].__dict__
            if len(attributes) != entry[1]:
                entry[1] = len(attributes)
                entry[2] = tuple(k for k, v in attributes.items()
                                 if k not in _TORCH_ATTRIBUTES and isinstance(v, _HOLDERS))
            for name in entry[2]:
                value = attributes.get(name)
                if isinstance(value, torch.Tensor):
                    yield value
                elif isinstance(value, (list, tuple, dict)):
                    yield from (v for v in (value.values() if isinstance(value, dict) else value)
                                if isinstance(v, torch.Tensor))


class OldTensors:
    """The tensors that exist before a backward, with their version counters: those the model's
    modules hold as attributes (:class:`ModuleState`), and the gradients the last call read. An
    attention gradient the model hands over after the backward that shares storage with one of
    them, unchanged since (same version), was not written by this backward: it is stale. Found
    without calling any model method (a model may compute on its gradients in
    ``get_attention_layers``, which only works after the backward), and holding references so no
    old storage is reused while the check is pending."""

    def __init__(self, state: ModuleState, read: list[tuple[weakref.ref, int]]) -> None:
        self.held: dict[int, list[tuple[torch.Tensor, int]]] = {}
        for tensor in state.tensors():
            self._add(tensor, tensor._version)
        for ref, version in read:
            tensor = ref()
            if tensor is not None:
                self._add(tensor, version)

    def _add(self, tensor: torch.Tensor, version: int) -> None:
        if tensor.numel():
            self.held.setdefault(tensor.untyped_storage().data_ptr(), []).append((tensor, version))

    def stale(self, grad: torch.Tensor) -> bool:
        if not grad.numel():
            return False
        return any(old._version == version == grad._version
                   for old, version in self.held.get(grad.untyped_storage().data_ptr(), ()))


def first_stale(layers: Any, old: OldTensors) -> tuple[str, int] | None:
    """The first attention gradient an earlier call left, as ``(key, layer)``, or ``None``."""
    if not isinstance(layers, dict):
        return None
    for key, pairs in layers.items():
        for i, pair in enumerate(pairs if isinstance(pairs, (list, tuple)) else ()):
            if is_pair(pair) and isinstance(pair[1], torch.Tensor) and old.stale(pair[1]):
                return key, i
    return None


def is_pair(pair: Any) -> bool:
    """An attention layer as ``get_attention_layers`` lists it: ``(attention map, gradient)``."""
    return isinstance(pair, (list, tuple)) and len(pair) == 2


def all_gradients(layers: Any) -> bool:
    """Whether every listed attention layer has a gradient tensor."""
    return isinstance(layers, dict) and all(
        isinstance(pairs, (list, tuple)) and all(is_pair(p) and isinstance(p[1], torch.Tensor) for p in pairs)
        for pairs in layers.values())
