"""How a cohort run cuts its batches: samples sorted by length in windows (each read once) and cut
into batches of a number of samples or of padded positions; which loaders can be sorted; how a
resumed run is cut as it was."""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from fastattr.core.checks import check_auto_flag, check_count
from fastattr.interpret.batches import batch_size
from fastattr.interpret.features import FeatureLayout, model_device
from fastattr.runs.row_shapes import AloneShapes, alone_shapes, iterate_recording


def _sample_length(model: Any, sample: Mapping[str, Any]) -> int:
    """Positions of one sample over the model's features: non-padding entries of integer values,
    the first dim of other tensors, leaves of nested lists."""
    total = 0
    for key in getattr(model, "feature_keys", []):
        if key not in sample:
            continue
        feature = sample[key]
        value = FeatureLayout.of(model, key).value(feature) if isinstance(feature, tuple) else feature
        if isinstance(value, torch.Tensor):
            if value.is_floating_point():
                total += value.shape[0] if value.dim() else 1
            else:
                total += int((value != 0).sum())
        elif isinstance(value, (list, tuple)):
            total += sum(len(v) if isinstance(v, (list, tuple)) else 1 for v in value)
        else:
            total += 1
    return max(total, 1)


# Samples read and sorted together by LengthSortedBatches: each is read once, and memory holds
# one window of samples, however large the dataset.
SORT_WINDOW = 8192


class LengthSortedBatches:
    """Batches of a map-style dataset grouped by length, so each is padded only to its own longest.

    The dataset is read once, in windows of ``window`` consecutive samples: within a window the
    samples are sorted by their length over the model's features (ties by position, so the order
    is the same on every run and rank) and cut into batches of ``batch_size`` samples or, with
    ``batch_tokens``, of at most that many padded positions (samples x the batch's longest).
    Iterating yields collated batches; :meth:`with_positions` also gives each batch's dataset
    positions. Memory holds one window of samples.
    """

    def __init__(self, dataset: Any, model: Any, *, batch_size: int | None = None, batch_tokens: int | None = None,
                 collate_fn: Any = None, window: int = SORT_WINDOW) -> None:
        if (batch_size is None) == (batch_tokens is None):
            raise ValueError("give exactly one of batch_size (samples per batch) and batch_tokens (padded positions "
                             "per batch)")
        check_count("batch_size", batch_size, optional=True)
        check_count("batch_tokens", batch_tokens, optional=True)
        check_count("window", window)
        self.dataset, self.model = dataset, model
        self.batch_size, self.batch_tokens, self.window = batch_size, batch_tokens, window
        self.collate_fn = collate_fn or torch.utils.data.default_collate

    def _cut(self, lengths: list[int]) -> list[list[int]]:
        """One window's batches, as indices into the window, from its samples' lengths."""
        order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
        batches: list[list[int]] = []
        current: list[int] = []
        for i in order:
            longest = lengths[i]  # ascending: the newest sample is the batch's longest
            full = len(current) >= self.batch_size if self.batch_size is not None else \
                bool(current) and (len(current) + 1) * longest > self.batch_tokens
            if full:
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
        return batches

    def with_positions(self, skip: Any = None) -> Iterator[tuple[list[int], dict[str, Any] | None]]:
        """``(dataset positions, collated batch)`` per batch, in order; a batch whose index
        ``skip(index)`` is true is not collated (``None``: another process takes it)."""
        for positions, batch, _ in self.for_run(skip, record_shapes=False):
            yield positions, batch

    def for_run(self, skip: Any = None, record_shapes: bool = True
                ) -> Iterator[tuple[list[int], dict[str, Any] | None, list[AloneShapes] | None]]:
        """:meth:`with_positions` with each collated batch's samples' own shapes (the collate's
        batch of one: :func:`fastattr.runs.row_shapes.alone_shapes`)."""
        index = 0
        for start in range(0, len(self.dataset), self.window):
            samples = [self.dataset[i] for i in range(start, min(start + self.window, len(self.dataset)))]
            for members in self._cut([_sample_length(self.model, sample) for sample in samples]):
                positions = [start + i for i in members]
                if skip is not None and skip(index):
                    yield positions, None, None
                else:
                    chosen = [samples[i] for i in members]
                    yield positions, self.collate_fn(chosen), \
                        alone_shapes(self.collate_fn, chosen) if record_shapes else None
                index += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for _, batch in self.with_positions():
            yield batch


# Padded positions per batch when attribute_dataset rebatches a loader of batch size 1 (PyHealth's
# docs recommend batch size 1 for interpretability: one patient per forward leaves the hardware
# idle). Measured on the 2-core reference CPU (`python -m benchmarks.long_tail tokens`, PyHealth
# Transformer d64, long-tailed lengths, benchmarks/RESULTS.md "Cohort batch size"): IG is within
# 3% of its best from 1,024 to 8,192, Chefer gains up to 16,384; 4,096 is within 1% (IG) and 5%
# (Chefer) of each one's best. On CUDA not measured yet: larger batches, as IG runs all rows there.
COHORT_BATCH_TOKENS = {"cpu": 4096, "cuda": 16384}


def _sort_source(dataloader: Any) -> tuple[Any, int, Any] | str:
    """``(dataset, batch size, collate_fn)`` of a loader whose samples can be read by position and
    regrouped without changing which samples it yields, or why not.

    That is a ``DataLoader`` over a map-style dataset with its sequential sampler, or over an
    iterable dataset that can also be indexed and that the loader says it iterates in index
    order: PyHealth's ``get_dataloader(dataset, batch_size, shuffle=False)`` (its datasets are
    iterable, with ``__getitem__`` and ``__len__``, and its loader keeps ``shuffle_samples``)."""
    if not isinstance(dataloader, torch.utils.data.DataLoader):
        return f"the loader ({type(dataloader).__name__}) is not a torch DataLoader"
    dataset = dataloader.dataset
    if dataloader.batch_size is None:
        return "it has a batch sampler of its own"
    if isinstance(dataset, torch.utils.data.IterableDataset):
        indexable = callable(getattr(dataset, "__getitem__", None)) and callable(getattr(dataset, "__len__", None))
        if not indexable:
            return "its dataset is an iterable dataset (no positions to sort by)"
        if getattr(dataloader, "shuffle_samples", None) is not False:
            return ("its dataset is iterable and the loader does not say it iterates in index order "
                    "(PyHealth's get_dataloader(..., shuffle=False) does)")
    elif not isinstance(dataloader.sampler, torch.utils.data.SequentialSampler):
        return "it has a sampler of its own (shuffle=True, a subset or a batch sampler)"
    if dataloader.drop_last:
        return "it drops its last batch (drop_last=True)"
    return dataset, dataloader.batch_size, dataloader.collate_fn


def choose_batching(dataloader: Any, model: Any, sort_by_length: Any, batch_tokens: int | None,
                    recorded: dict[str, Any] | None, dependent: bool = False) -> tuple[Any, dict[str, Any]]:
    """The batches to attribute (a loader, or :class:`LengthSortedBatches` over its dataset) and
    how they were made (stored in ``run.json``, and reused when a run is resumed with defaults).

    ``dependent``: the method's values depend on each patient's batch
    (:func:`fastattr.cohort.methods.batch_dependent`). Then ``"auto"`` keeps the loader's batches as
    given (sorting would change the values), and the record says so with how they were cut."""
    check_auto_flag("sort_by_length", sort_by_length)
    check_count("batch_tokens", batch_tokens, optional=True)
    if isinstance(dataloader, LengthSortedBatches):
        return dataloader, _sorted_record(dataloader, dependent)
    if sort_by_length == "auto" and recorded is not None and not recorded.get("sorted"):
        sort_by_length = False  # a run begun in the loader's order resumes in it
    if sort_by_length == "auto" and dependent:
        if batch_tokens is not None:
            raise ValueError("batch_tokens cuts batches sorted by length, which changes the values of a method whose "
                             "values depend on the batch (SHAP, LIME, RandomBaseline); pass sort_by_length=True to "
                             "sort anyway")
        sort_by_length = False
    if sort_by_length is False:
        if batch_tokens is not None:
            raise ValueError("batch_tokens applies only when batches are sorted by length (sort_by_length='auto' "
                             "or True)")
        return dataloader, _loader_record(dataloader, dependent, recorded)
    source = _sort_source(dataloader) if model is not None else "the interpreter has no .model"
    if isinstance(source, str):
        if sort_by_length is True:
            raise ValueError(f"sort_by_length=True needs a DataLoader over a map-style dataset, in order: {source}")
        warnings.warn(f"attribute_dataset: batches run in the loader's order, not sorted by length, because {source}; "
                      "pass sort_by_length=False to say that is intended", stacklevel=3)
        return dataloader, _loader_record(dataloader, dependent, recorded)
    dataset, size, collate = source
    window = SORT_WINDOW
    if recorded and recorded.get("sorted") and batch_tokens is None:  # resume as it was cut
        size, batch_tokens = recorded.get("batch_size"), recorded.get("batch_tokens")
        window = recorded.get("window", SORT_WINDOW)
    elif batch_tokens is None and size == 1:
        batch_tokens = COHORT_BATCH_TOKENS.get(model_device(model).type, COHORT_BATCH_TOKENS["cuda"])
    batches = LengthSortedBatches(dataset, model, batch_size=None if batch_tokens else size,
                                  batch_tokens=batch_tokens, collate_fn=collate, window=window)
    return batches, _sorted_record(batches, dependent)


def _sorted_record(batches: LengthSortedBatches, dependent: bool) -> dict[str, Any]:
    """``run.json``'s ``batching`` of length-sorted batches."""
    record = {"sorted": True, "batch_size": batches.batch_size, "batch_tokens": batches.batch_tokens,
              "window": batches.window}
    if dependent:
        record.update(batch_dependent=True, order="sorted by length in windows (ties by position)",
                      padding=f"each batch padded by {_name(batches.collate_fn)} to its own longest")
    return record


def _loader_record(dataloader: Any, dependent: bool, recorded: dict[str, Any] | None) -> dict[str, Any]:
    """``run.json``'s ``batching`` of a loader's own batches: ``{"sorted": False}``; for a method whose
    values depend on the batch also the loader's batch size, order and padding (a resumed run must cut
    the same batches: a loader of another batch size is refused)."""
    if not dependent:
        return {"sorted": False}
    size = getattr(dataloader, "batch_size", None)
    if recorded and recorded.get("batch_dependent") and recorded.get("batch_size") != size:
        raise ValueError(f"this run was attributed in the loader's batches of {recorded.get('batch_size')} patients "
                         f"and its method's values depend on the batch; resume it with a loader of that batch size, "
                         f"not {size}")
    collate = getattr(dataloader, "collate_fn", None)
    return {"sorted": False, "batch_dependent": True, "batch_size": size, "order": "the loader's, as given",
            "padding": f"each batch as the loader pads it ({_name(collate)})" if collate else
            "each batch as the loader gives it"}


def _name(function: Any) -> str:
    """``module.qualname`` of a collate function."""
    return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', type(function).__name__)}"


def in_order(dataloader: Iterable[dict[str, Any]]
             ) -> Iterator[tuple[list[int], dict[str, Any], list[AloneShapes] | None]]:
    """A loader's batches with their positions (0, 1, ... in the order it yields samples) and,
    where it can be recorded, their samples' own shapes (:func:`fastattr.runs.row_shapes.iterate_recording`)."""
    seen = 0
    for batch, alone in iterate_recording(dataloader):
        size = batch_size(batch)
        yield list(range(seen, seen + size)), batch, alone
        seen += size
