"""PyHealth's ``Interpretable`` protocol as its interpreters check it, without importing PyHealth: the
check, and the errors the drop-ins raise alike (PyHealth's types)."""
from __future__ import annotations

from typing import Any

INTERPRETABLE_METHODS = ("forward_from_embedding", "get_embedding_model")


class BaselineKeyError(KeyError, ValueError):
    """A baseline without a feature key of the batch (a ``KeyError`` as PyHealth's, and a ``ValueError``)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class MissingEmbeddingForward(ValueError, AssertionError):
    """``use_embeddings=True`` for a model without ``forward_from_embedding`` (PyHealth asserts it: an
    ``AssertionError``, and a ``ValueError``)."""


def is_interpretable(model: Any) -> bool:
    """PyHealth's ``isinstance(model, Interpretable)`` without importing PyHealth: a class named
    ``Interpretable`` among the model's bases, or a model with its methods (:data:`INTERPRETABLE_METHODS`)."""
    if any(cls.__name__ == "Interpretable" for cls in type(model).__mro__):
        return True
    return all(callable(getattr(model, m, None)) for m in INTERPRETABLE_METHODS)


def require_interpretable(model: Any, use_embeddings: bool = False) -> None:
    """PyHealth's refusals, their types and messages: ``ValueError`` for a model that is not
    ``Interpretable``; :class:`MissingEmbeddingForward` where ``use_embeddings`` and it has no
    ``forward_from_embedding``."""
    if not is_interpretable(model):
        raise ValueError("Model must implement Interpretable interface")
    if use_embeddings and not hasattr(model, "forward_from_embedding"):
        raise MissingEmbeddingForward(
            f"Model {type(model).__name__} must implement forward_from_embedding() to gate embeddings; "
            "set use_embeddings=False to gate the raw input values")
