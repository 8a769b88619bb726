"""The PyHealth feature protocol, in one place: fastattr never imports PyHealth.

A PyHealth batch maps each feature key to a tensor or to a tuple laid out by the feature's processor
schema (``("value",)``, ``("time", "value", "mask")``...). :class:`FeatureLayout` knows one feature's
layout (where the value and mask sit, token or continuous, PyHealth's rule for the mask it appends
when the schema has none); :class:`FeatureBatch` holds a batch's features under their layouts and is
the only code that indexes a feature tuple: it selects samples, trims padding, puts embedded or
interpolated values back and expands results to the inputs' shapes. Everything in fastattr uses it.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
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


@dataclass(frozen=True)
class FeatureLayout:
    """One feature's tuple layout, from its processor's ``schema()`` and ``is_token()``."""

    key: str
    schema: tuple[str, ...]
    token: bool

    @classmethod
    def of(cls, model: Any, key: str) -> FeatureLayout:
        processor = model.dataset.input_processors[key]
        schema = tuple(processor.schema())
        if "value" not in schema:
            raise ValueError(f"the schema of feature {key!r} has no 'value' element: {schema}")
        return cls(key, schema, bool(processor.is_token()))

    @property
    def value_slot(self) -> int:
        return self.schema.index("value")

    def parts(self, feature: Any) -> tuple:
        """The feature as a tuple (a bare tensor is a 1-tuple)."""
        if isinstance(feature, torch.Tensor):
            return (feature,)
        if isinstance(feature, list):
            return tuple(feature)
        if not isinstance(feature, tuple):
            raise TypeError(f"batch[{self.key!r}] must be a tensor or a tuple of tensors; got {type(feature).__name__}")
        return feature

    def value(self, feature: Any) -> Any:
        return self.parts(feature)[self.value_slot]

    def mask(self, feature: Any) -> torch.Tensor | None:
        """The schema's mask, else an appended trailing element, else ``None``."""
        parts = self.parts(feature)
        if "mask" in self.schema:
            return parts[self.schema.index("mask")]
        return parts[-1] if len(parts) == len(self.schema) + 1 else None

    def build_mask(self, value: torch.Tensor) -> torch.Tensor:
        """PyHealth's appended mask: tokens ``value != 0``; continuous values with >= 3 dims
        ``|value|.sum(-1) != 0``, else ``value != 0``; as int."""
        if self.token or value.dim() < 3:
            return (value != 0).int()
        return (value.abs().sum(dim=-1) != 0).int()

    def with_mask(self, feature: Any) -> tuple:
        """The feature with PyHealth's mask appended when its schema has none."""
        parts = self.parts(feature)
        if "mask" in self.schema or len(parts) == len(self.schema) + 1:
            return parts
        value = parts[self.value_slot]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"the value of feature {self.key!r} must be a tensor; got {type(value).__name__}")
        return (*parts, self.build_mask(value))

    def replace_value(self, feature: Any, value: Any) -> tuple:
        parts = self.parts(feature)
        slot = self.value_slot
        return (*parts[:slot], value, *parts[slot + 1:])

    def padded_dims(self, value: torch.Tensor, mask: torch.Tensor | None) -> int:
        """How many dims after the batch dim are positions that padding fills: every dim of a token
        value; a continuous value's dims but its last (the numbers of one position); never more
        than the mask describes."""
        if mask is None or not isinstance(mask, torch.Tensor):
            return 0
        dims = value.dim() - 1 if self.token else value.dim() - 2
        return max(0, min(dims, mask.dim() - 1))


def code_vocab(model: Any, key: str) -> Any:
    """The ``{code: id}`` vocabulary of a token feature's processor (PyHealth's ``code_vocab``), or ``None``."""
    return getattr(model.dataset.input_processors[key], "code_vocab", None)


def layouts(model: Any) -> dict[str, FeatureLayout]:
    """The layout of every feature key of ``model``."""
    return {key: FeatureLayout.of(model, key) for key in model.feature_keys}


def _narrow_like(tensor: Any, full: torch.Size, sizes: tuple[int, ...]) -> Any:
    """``tensor`` cut to ``sizes`` on each padded dim (1, 2, ...) where it spans the full value's size
    (a size above the full one pads it further with zeros, the collate's padding)."""
    if not isinstance(tensor, torch.Tensor):
        return tensor
    for d, size in enumerate(sizes, start=1):
        if tensor.dim() > d and tensor.shape[d] == full[d] and size != full[d]:
            grow = [0, 0] * (tensor.dim() - d - 1) + [0, max(0, size - full[d])]
            tensor = torch.nn.functional.pad(tensor, grow) if size > full[d] else tensor.narrow(d, 0, size)
    return tensor


class FeatureBatch:
    """The features of one PyHealth batch, each as a tuple under its :class:`FeatureLayout`.

    Build one with :meth:`from_batch`. Entries that are not feature keys (labels, ids) are left
    out. All per-feature knowledge of the protocol is here: the value and mask of each feature,
    PyHealth's appended masks, selecting samples, trimming padding, putting other values in the
    value slot, and mapping a result back to the raw inputs' shape.
    """

    def __init__(self, features: dict[str, tuple], layouts_: dict[str, FeatureLayout],
                 raw_shapes: dict[str, torch.Size], bare: frozenset[str] = frozenset(),
                 appended: frozenset[str] = frozenset()) -> None:
        self.features = features
        self.layouts = layouts_
        self.raw_shapes = raw_shapes
        #: keys the batch gave as a bare tensor, and keys whose mask this batch appended
        self.bare, self.appended = bare, appended

    @classmethod
    def from_batch(cls, model: Any, batch: Mapping[str, Any], *, device: torch.device | None = None) -> FeatureBatch:
        """The feature entries of ``batch`` (in ``model.feature_keys`` order), moved to ``device``,
        with PyHealth's masks appended where the schema has none. Raises on a batch with no
        feature key, a value that is not a tensor, or features that disagree on the batch size."""
        present = [k for k in model.feature_keys if k in batch]
        if not present:
            raise ValueError(f"the batch has none of the model's feature keys {list(model.feature_keys)}; "
                             f"got keys {sorted(batch)}")
        features, lays, shapes, appended = {}, {}, {}, set()
        for key in present:
            layout = FeatureLayout.of(model, key)
            parts = layout.parts(batch[key])
            if device is not None:
                parts = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in parts)
            value = parts[layout.value_slot] if len(parts) > layout.value_slot else None
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"the value of feature {key!r} must be a tensor; got {type(value).__name__}")
            features[key] = layout.with_mask(parts)
            if len(features[key]) > len(parts):
                appended.add(key)
            lays[key] = layout
            shapes[key] = value.shape
        sizes = {s[0] if len(s) else 0 for s in shapes.values()}
        if 0 in sizes:
            raise ValueError("the batch is empty (batch size 0)")
        if len(sizes) != 1:
            raise ValueError(f"feature values disagree on the batch size: {sorted(sizes)}")
        bare = frozenset(k for k in present if isinstance(batch[k], torch.Tensor))
        return cls(features, lays, shapes, bare, frozenset(appended))

    # -- reading ---------------------------------------------------------------------------
    @property
    def keys(self) -> list[str]:
        return list(self.features)

    @property
    def size(self) -> int:
        """Samples in the batch."""
        return next(iter(self.raw_shapes.values()))[0]

    def value(self, key: str) -> torch.Tensor:
        return self.layouts[key].value(self.features[key])

    def values(self) -> dict[str, torch.Tensor]:
        return {k: self.value(k) for k in self.features}

    def mask(self, key: str) -> torch.Tensor | None:
        return self.layouts[key].mask(self.features[key])

    def token_keys(self) -> set[str]:
        return {k for k in self.features if self.layouts[k].token}

    def others(self) -> dict[str, tuple]:
        """Per key, the tuple elements other than the value (masks, times), in order."""
        return {k: tuple(t for i, t in enumerate(f) if i != self.layouts[k].value_slot)
                for k, f in self.features.items()}

    # -- building model calls ------------------------------------------------------------
    def call(self, values: Mapping[str, Any] | None = None,
             others: Mapping[str, tuple] | None = None) -> dict[str, tuple]:
        """Model keyword arguments: each feature's tuple with ``values[key]`` in the value slot
        (the batch's own value where not given) and ``others[key]`` (see :meth:`others`) in
        the remaining slots (the batch's own where not given)."""
        out = {}
        for key, feature in self.features.items():
            slot = self.layouts[key].value_slot
            value = values[key] if values is not None and key in values else feature[slot]
            rest = list(others[key]) if others is not None and key in others else \
                [t for i, t in enumerate(feature) if i != slot]
            rest.insert(slot, value)
            out[key] = tuple(rest)
        return out

    def inputs(self) -> dict[str, Any]:
        """The features as the batch gave them (a bare tensor stays bare, no appended mask), so a
        model called with them sees what it would have seen in the caller's batch."""
        out = {}
        for key, feature in self.features.items():
            parts = feature[:-1] if key in self.appended else feature
            out[key] = parts[0] if key in self.bare else parts
        return out

    # -- selecting and trimming ----------------------------------------------------------
    def lengths(self) -> torch.Tensor:
        """``[B, D]``: per sample, one past its last non-padding position along every padded dim of
        every feature (from the masks; at least 1). ``D`` may be 0 (nothing is padded)."""
        columns = []
        for key, span in zip(self.features, self.padded_spans(), strict=False):
            mask = self.mask(key)
            for d in range(1, span + 1):
                present = _any_except(mask.ne(0), d)
                n = present.shape[1]
                position = torch.arange(1, n + 1, device=present.device)
                columns.append((present.long() * position).amax(dim=1).clamp_min(1))
        if not columns:
            return torch.zeros(self.size, 0, dtype=torch.long)
        return torch.stack(columns, dim=1).cpu()

    def leading_present(self) -> torch.Tensor:
        """``[B, K]`` bool: per sample, whether the first position along each padded feature's first
        padded dim holds data (not padding), from the masks; K counts the features with padded dims."""
        spans = zip(self.features, self.padded_spans(), strict=True)
        columns = [_any_except(self.mask(k).ne(0), 1)[:, 0] for k, span in spans if span]
        if not columns:
            return torch.ones(self.size, 0, dtype=torch.bool)
        return torch.stack(columns, dim=1).cpu()

    def padded_spans(self) -> list[int]:
        """How many columns of :meth:`lengths` each feature owns, in feature order."""
        return [self.layouts[k].padded_dims(self.value(k), self.mask(k)) for k in self.features]

    def padded_sizes(self) -> list[int]:
        """The batch's size along every padded dim, in the order of :meth:`lengths`' columns."""
        return [self.value(k).shape[d] for k, span in zip(self.features, self.padded_spans(), strict=False)
                for d in range(1, span + 1)]

    def _per_key(self, sizes: list[int]) -> dict[str, tuple[int, ...]]:
        ends = torch.tensor(self.padded_spans(), dtype=torch.long).cumsum(0).tolist()
        spans = self.padded_spans()
        return {key: tuple(sizes[end - span:end]) for key, span, end in zip(self.features, spans, ends, strict=True)}

    def subset(self, index: torch.Tensor, sizes: list[int] | None = None) -> FeatureBatch:
        """The samples ``index`` (LongTensor), with every padded dim cut (or padded further) to ``sizes``
        (in the order of :meth:`lengths`' columns; ``None`` keeps the full sizes). The time, value
        and mask of a feature are cut together."""
        per_key = self._per_key(sizes) if sizes is not None else {k: () for k in self.features}
        features, shapes = {}, {}
        for key, feature in self.features.items():
            full = self.value(key).shape
            parts = []
            for t in feature:
                if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == self.size:
                    t = t.index_select(0, index.to(t.device))
                parts.append(_narrow_like(t, full, per_key[key]))
            features[key] = tuple(parts)
            shapes[key] = features[key][self.layouts[key].value_slot].shape
        return FeatureBatch(features, self.layouts, shapes, self.bare, self.appended)

    def cut(self, key: str, tensor: torch.Tensor, index: torch.Tensor, sizes: list[int] | None) -> torch.Tensor:
        """A tensor that broadcasts to feature ``key``'s value (a baseline), cut like :meth:`subset`."""
        full = self.value(key).shape
        if tensor.dim() == len(full) and tensor.shape[0] == self.size:
            tensor = tensor.index_select(0, index.to(tensor.device))
        per_key = self._per_key(sizes) if sizes is not None else {k: () for k in self.features}
        return _narrow_like(tensor, full, per_key[key])

    # -- results ---------------------------------------------------------------------------
    def keep(self, key: str, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """A bool tensor of ``shape`` (a result in feature ``key``'s raw value shape): ``False`` at
        padding, i.e. where the mask is 0 along the feature's padded dims (every dim of a token
        value, a continuous value's dims but its last); all ``True`` when nothing is padded."""
        value, mask = self.value(key), self.mask(key)
        span = self.layouts[key].padded_dims(value, mask)
        if span == 0:
            return torch.ones(shape, dtype=torch.bool)
        present = mask.ne(0).reshape(*mask.shape[: span + 1], -1).any(-1) if mask.dim() > span + 1 else mask.ne(0)
        present = present.cpu()
        while present.dim() < len(shape):
            present = present.unsqueeze(-1)
        return present.expand(shape).contiguous()

    def expand(self, results: Mapping[str, torch.Tensor], *, nested_only: bool = False) -> dict[str, torch.Tensor]:
        """PyHealth's shape mapping: where a result has fewer dims than the raw value, unsqueeze
        trailing dims; then expand to the raw value's shape where it broadcasts.

        ``nested_only`` is Chefer's rule: only a result with fewer dims than the raw value (a
        nested sequence's per-visit relevance) is expanded; one with as many keeps the shape the
        model gave it (a Transformer's ``tensor`` feature is one token: ``[B, 1]``, not ``[B, F]``).
        IG's rule (the default) also expands a result of the raw value's rank."""
        out = {}
        for key, attr in results.items():
            shape = self.raw_shapes.get(key)
            if nested_only and (shape is None or attr.dim() >= len(shape)):
                out[key] = attr
                continue
            if shape is not None and attr.shape != shape:
                while attr.dim() < len(shape):
                    attr = attr.unsqueeze(-1)
                try:
                    broadcasts = torch.broadcast_shapes(attr.shape, shape) == shape
                except RuntimeError:
                    broadcasts = False
                if broadcasts:
                    attr = attr.expand(shape)
            out[key] = attr
        return out

    def place(self, parts: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
        """Results of :meth:`subset` batches, ``[(index, {key: result}), ...]``, scattered back to
        this batch's raw shapes: exact zeros wherever a part was trimmed (padding)."""
        out = {}
        for key, shape in self.raw_shapes.items():
            pieces = [(index, result[key]) for index, result in parts if key in result]
            if pieces:
                out[key] = scatter_rows(pieces, shape)
        return out

    def place_relevance(self, parts: list[tuple[torch.Tensor, FeatureBatch, Mapping[str, torch.Tensor]]]
                        ) -> dict[str, torch.Tensor] | None:
        """Per-sample results of length groups, ``[(index, group batch, {key: result}), ...]``, back
        in one batch, for results shaped by the model rather than like the inputs (Chefer's
        ``[b, n]`` per key): dim 1 follows the feature's first padded dim (its tokens or visits,
        with any fixed offset such as a CLS token), so it grows by what the group's trimming took
        off that dim, with exact zeros there; other dims are kept. ``None`` when the groups
        disagree on that shape (it cannot be inferred from them)."""
        out = {}
        keys = set(parts[0][2])
        for key in keys:
            trimmed = key in self.features and self.layouts[key].padded_dims(self.value(key), self.mask(key)) > 0
            shape = None
            for index, part, result in parts:
                r = result.get(key)
                if not isinstance(r, torch.Tensor) or r.dim() == 0 or r.shape[0] != len(index) or set(result) != keys:
                    return None
                grown = list(r.shape[1:])
                if trimmed and grown:
                    grown[0] += self.value(key).shape[1] - part.value(key).shape[1]
                if shape not in (None, grown):
                    return None
                shape = grown
            out[key] = scatter_rows([(index, result[key]) for index, _, result in parts], (self.size, *shape))
        return out


def scatter_rows(pieces: list[tuple[torch.Tensor, torch.Tensor]], shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """``[(sample index, rows), ...]`` into zeros of ``shape``: each piece's rows at its samples,
    in the leading corner of the other dims (the rest, trimmed padding, stays exactly zero)."""
    full = pieces[0][1].new_zeros(shape)
    for index, rows in pieces:
        full[(index.to(full.device),) + tuple(slice(0, n) for n in rows.shape[1:])] = rows
    return full


def _any_except(present: torch.Tensor, d: int) -> torch.Tensor:
    """``present`` [B, ...] reduced with ``any`` over every dim but 0 and ``d``: [B, size of d]."""
    moved = present.movedim(d, 1)
    return moved.reshape(moved.shape[0], moved.shape[1], -1).any(dim=2)
