"""Each sample's row in a run folder has one shape, however the run was batched.

A shard holds its batch's tensors padded to the batch's widest sample, and which samples share a
batch depends on the batching (sorted by length, rebatched, in the loader's order, split over
torchrun ranks). So beside every per-sample tensor of a feature with padded dims, the writer stores
``shape/<name>``: ``[B, dims]`` int64, each sample's own shape, and the reader cuts each row to it.

A sample's own shape is the one the loader's ``collate_fn`` gives the sample alone: PyHealth's batch
of one (its own length; a nested sequence's own visits, each as wide as its processor pads visits; a
StageNet tuple's value; a continuous ``[T, F]`` value's own ``T``). The runner records it from the
samples themselves where it sees them before collation (length-sorted batches, and a ``DataLoader``
in its own order through :class:`RecordingCollate`); batches it only sees collated (a list of
batches, a loader without automatic batching) fall back to the masks: one past each sample's last
non-padding position. A result whose dims follow the value's padded dims at an offset (Chefer's
``[B, tokens + CLS]``) is cut by what the batch's padding added along them.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from fastattr.interpret.features import FeatureBatch
from fastattr.runs.files import SHAPE_PREFIX

# stored per-sample tensors that follow a feature's value: attributions, token ids, padding masks
ROW_KINDS = ("attr/", "input/", "keep/")

# per sample: for each entry of its batch of one, the shape of each part (batch dim dropped; None
# where a part is not a tensor)
AloneShapes = dict[str, tuple[tuple[int, ...] | None, ...]]


def alone_shapes(collate: Callable[[list[Any]], Any], samples: Sequence[Any]) -> list[AloneShapes]:
    """For each sample, the shapes of the batch ``collate`` makes of it alone."""
    out = []
    for sample in samples:
        batch = collate([sample])
        shapes = {}
        for key, entry in batch.items() if isinstance(batch, Mapping) else ():
            parts = entry if isinstance(entry, (tuple, list)) else (entry,)
            shapes[key] = tuple(tuple(p.shape[1:]) if isinstance(p, torch.Tensor) and p.dim() else None
                                for p in parts)
        out.append(shapes)
    return out


class Collated(NamedTuple):
    """A batch with its samples' :func:`alone_shapes`."""

    batch: Any
    alone: list[AloneShapes]


class RecordingCollate:
    """A loader's ``collate_fn`` that also records each sample's :func:`alone_shapes` (picklable
    when the wrapped one is, so it runs in the loader's workers)."""

    def __init__(self, collate: Callable[[list[Any]], Any]) -> None:
        self.collate = collate

    def __call__(self, samples: list[Any]) -> Collated:
        return Collated(self.collate(samples), alone_shapes(self.collate, samples))


def iterate_recording(dataloader: Iterable[Any]) -> Iterator[tuple[Any, list[AloneShapes] | None]]:
    """``(batch, alone shapes or None)`` for each batch of ``dataloader``. A ``DataLoader`` that
    batches automatically gets :class:`RecordingCollate` for the iterator it starts here (its own
    ``collate_fn`` is put back at once); other loaders' batches come without shapes."""
    recording = isinstance(dataloader, torch.utils.data.DataLoader) and dataloader._auto_collation
    if recording:
        collate = dataloader.collate_fn
        dataloader.collate_fn = RecordingCollate(collate)
        try:
            iterator = iter(dataloader)
        finally:
            dataloader.collate_fn = collate
    else:
        iterator = iter(dataloader)
    for item in iterator:  # a loader with persistent workers may keep the collate it started with
        yield (item.batch, item.alone) if isinstance(item, Collated) else (item, None)


def _own_sizes(features: FeatureBatch, alone: list[AloneShapes] | None) -> dict[str, torch.Tensor]:
    """Per feature with padded dims: ``[B, span]``, each sample's own size along them."""
    spans = dict(zip(features.keys, features.padded_spans(), strict=True))
    if alone is None:
        lengths, out, column = features.lengths(), {}, 0
        for key, span in spans.items():
            if span:
                out[key] = lengths[:, column:column + span]
            column += span
        return out
    out = {}
    for key, span in spans.items():
        if span:
            values = [features.layouts[key].value(sample[key]) for sample in alone]
            out[key] = torch.tensor([list(shape[:span]) for shape in values], dtype=torch.long)
    return out


def row_shapes(features: FeatureBatch, tensors: Mapping[str, torch.Tensor],
               alone: list[AloneShapes] | None) -> dict[str, torch.Tensor]:
    """``shape/<name>`` for every stored ``attr/``, ``input/`` and ``keep/`` tensor of a feature
    with padded dims: each sample's row shape, the stored one less what the batch's padding added
    along the dims that follow the value's padded dims."""
    own = _own_sizes(features, alone)
    out = {}
    for name, tensor in tensors.items():
        kind, _, key = name.partition("/")
        if f"{kind}/" not in ROW_KINDS or key not in own or tensor.dim() < 2:
            continue
        sizes = own[key]
        padded = torch.tensor(features.value(key).shape[1:1 + sizes.shape[1]], dtype=torch.long)
        shapes = torch.tensor(tensor.shape[1:], dtype=torch.long).repeat(tensor.shape[0], 1)
        dims = min(sizes.shape[1], tensor.dim() - 1)
        shapes[:, :dims] -= (padded - sizes)[:, :dims]
        out[SHAPE_PREFIX + name] = shapes.clamp_min(0)
    return out

