"""The PyHealth model protocol, duck-typed: fastattr never imports PyHealth."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch


def require_methods(model: Any, names: Iterable[str], purpose: str) -> None:
    """Raise ``TypeError`` naming the first protocol attribute ``model`` lacks."""
    for name in names:
        if not callable(getattr(model, name, None)):
            raise TypeError(
                f"{purpose} needs model.{name}(), which {type(model).__name__} does not define "
                "(see the model protocol in fastattr's README)"
            )


def require_feature_protocol(model: Any, purpose: str) -> None:
    """Check ``feature_keys`` and ``dataset.input_processors[key].schema()/is_token()``."""
    keys = getattr(model, "feature_keys", None)
    if not isinstance(keys, (list, tuple)) or not keys:
        raise TypeError(f"{purpose} needs model.feature_keys, a non-empty list of feature names")
    processors = getattr(getattr(model, "dataset", None), "input_processors", None)
    if not isinstance(processors, Mapping):
        raise TypeError(f"{purpose} needs model.dataset.input_processors, a mapping from feature key to processor")
    for key in keys:
        if key not in processors:
            raise TypeError(f"{purpose}: model.dataset.input_processors has no processor for feature {key!r}")
        require_methods(processors[key], ("schema", "is_token"), f"{purpose} (processor of {key!r})")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{purpose} needs a torch.nn.Module model; got {type(model).__name__}")


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameter-free model)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def feature_tuples(model: Any, batch: Mapping[str, Any]) -> dict[str, tuple]:
    """The batch's feature entries as tuples, in ``model.feature_keys`` order; others dropped."""
    found = {k: (v,) if isinstance(v, torch.Tensor) else v for k, v in batch.items() if k in model.feature_keys}
    if not found:
        raise ValueError(
            f"the batch has none of the model's feature keys {list(model.feature_keys)}; got keys {sorted(batch)}"
        )
    for key, value in found.items():
        if not isinstance(value, tuple):
            raise TypeError(f"batch[{key!r}] must be a tensor or a tuple of tensors; got {type(value).__name__}")
    return {k: found[k] for k in model.feature_keys if k in found}


def value_index(model: Any, key: str) -> int:
    """Position of ``"value"`` in the feature's schema."""
    schema = tuple(model.dataset.input_processors[key].schema())
    if "value" not in schema:
        raise ValueError(f"the schema of feature {key!r} has no 'value' element: {schema}")
    return schema.index("value")


def with_masks(model: Any, features: Mapping[str, tuple]) -> dict[str, tuple]:
    """PyHealth's mask rule: a schema without ``"mask"`` gets one appended, built from the value
    (tokens: ``value != 0``; continuous with >= 3 dims: ``|value|.sum(-1) != 0``; else ``value != 0``)."""
    out = {}
    for key, feature in features.items():
        processor = model.dataset.input_processors[key]
        value = feature[value_index(model, key)]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"the value of feature {key!r} must be a tensor; got {type(value).__name__}")
        if "mask" in tuple(processor.schema()):
            out[key] = feature
            continue
        if processor.is_token() or value.dim() < 3:
            mask = (value != 0).int()
        else:
            mask = (value.abs().sum(dim=-1) != 0).int()
        out[key] = (*feature, mask)
    return out


def replace_value(feature: tuple, index: int, value: torch.Tensor) -> tuple:
    return (*feature[:index], value, *feature[index + 1:])


def expand_to_inputs(attributions: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
    """PyHealth's shape mapping: unsqueeze trailing dims, then expand to the raw value's shape."""
    out = {}
    for key, attr in attributions.items():
        shape = shapes.get(key)
        if shape is not None and attr.shape != shape:
            while attr.dim() < len(shape):
                attr = attr.unsqueeze(-1)
            if attr.shape != shape:
                attr = attr.expand(shape)
        out[key] = attr
    return out
