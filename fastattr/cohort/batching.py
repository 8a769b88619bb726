"""How a cohort run cuts its batches: samples sorted by length in windows (each read once) and cut
into batches of a number of samples or of padded positions; which loaders can be sorted; a model
that depends on padding kept in the loader's own batches; how a resumed run is cut as it was."""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from fastattr.cohort.padding_probe import PADDING_PROBE_SAMPLES, padding_dependence, padding_note
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


class DatasetBatches:
    """Batches of a map-style dataset read by position, once, in windows of ``window`` consecutive
    samples (memory holds one window), each window cut into batches by :meth:`_cut` and collated by
    ``collate_fn``. ``first``: the dataset's first samples, already read (by the padding probe of
    :func:`choose_batching`); the first iteration takes them instead of reading them again.
    Iterating yields collated batches; :meth:`with_positions` also gives each batch's dataset
    positions."""

    def __init__(self, dataset: Any, collate_fn: Any, window: int, first: Sequence[Any] = ()) -> None:
        check_count("window", window)
        self.dataset, self.window = dataset, window
        self.collate_fn = collate_fn or torch.utils.data.default_collate
        self._first = list(first)

    def _cut(self, samples: list[Any]) -> list[list[int]]:
        """One window's batches, as indices into the window."""
        raise NotImplementedError

    def _windows(self) -> Iterator[tuple[int, list[Any]]]:
        """``(first position, samples)`` of each window, in order."""
        first, self._first = self._first, []
        for start in range(0, len(self.dataset), self.window):
            stop = min(start + self.window, len(self.dataset))
            yield start, [first[i] if i < len(first) else self.dataset[i] for i in range(start, stop)]

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
        for start, samples in self._windows():
            for members in self._cut(samples):
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


class LengthSortedBatches(DatasetBatches):
    """Batches of a map-style dataset grouped by length, so each is padded only to its own longest.

    The dataset is read once, in windows of ``window`` consecutive samples: within a window the
    samples are sorted by their length over the model's features (ties by position, so the order
    is the same on every run and rank) and cut into batches of ``batch_size`` samples or, with
    ``batch_tokens``, of at most that many padded positions (samples x the batch's longest).
    Iterating yields collated batches; :meth:`with_positions` also gives each batch's dataset
    positions. Memory holds one window of samples. ``first``: the dataset's first samples, already
    read (they are not read again).
    """

    def __init__(self, dataset: Any, model: Any, *, batch_size: int | None = None, batch_tokens: int | None = None,
                 collate_fn: Any = None, window: int = SORT_WINDOW, first: Sequence[Any] = ()) -> None:
        if (batch_size is None) == (batch_tokens is None):
            raise ValueError("give exactly one of batch_size (samples per batch) and batch_tokens (padded positions "
                             "per batch)")
        check_count("batch_size", batch_size, optional=True)
        check_count("batch_tokens", batch_tokens, optional=True)
        super().__init__(dataset, collate_fn, window, first)
        self.model, self.batch_size, self.batch_tokens = model, batch_size, batch_tokens

    def _cut(self, samples: list[Any]) -> list[list[int]]:
        """One window's batches, as indices into the window, sorted by the samples' lengths."""
        lengths = [_sample_length(self.model, sample) for sample in samples]
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


class LoaderOrderBatches(DatasetBatches):
    """A ``DataLoader``'s own batches, read from its dataset by position: consecutive runs of
    ``batch_size`` samples from position 0 (the last one shorter), each collated by its
    ``collate_fn``, i.e. the very batches an in-order loader without ``drop_last`` yields. What
    :func:`choose_batching` runs for a model whose output depends on padding, so that the samples its
    probe read (``first``) are not read again. Memory holds one batch of samples."""

    def __init__(self, dataset: Any, batch_size: int, collate_fn: Any = None, first: Sequence[Any] = ()) -> None:
        check_count("batch_size", batch_size)
        super().__init__(dataset, collate_fn, batch_size, first)  # a window is one of the loader's batches
        self.batch_size = batch_size

    def _cut(self, samples: list[Any]) -> list[list[int]]:
        """The window, whole: one loader batch."""
        return [list(range(len(samples)))]


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
                    recorded: dict[str, Any] | None, dependent: bool = False,
                    explain: Callable[[dict[str, Any]], Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """The batches to attribute (a loader, :class:`LengthSortedBatches` over its dataset, or its own
    batches read as :class:`LoaderOrderBatches`) and how they were made (stored in ``run.json``, and
    reused when a run is resumed with defaults).

    ``dependent``: the method's values depend on each patient's batch
    (:func:`fastattr.cohort.methods.batch_dependent`). Then ``"auto"`` keeps the loader's batches as
    given (sorting would change the values), and the record says so with how they were cut.

    A model's output may depend on padding too (:mod:`fastattr.interpret.padding`), and with it a
    method's values: then a patient's values depend on the other patients of its batch, and sorting
    would change them. So a run about to be sorted afresh first probes the method
    (:func:`fastattr.cohort.padding_probe.padding_dependence`) on the dataset's first
    ``PADDING_PROBE_SAMPLES`` samples, which its batches then take over (each sample is still read
    once); ``explain``: the method on a batch (``interpreter.attribute`` with the run's options),
    without which the model's own verdict decides. Where the values depend on padding, ``"auto"``
    runs the loader's own batches (:class:`LoaderOrderBatches`: the same samples together, in the
    same order, padded by its ``collate_fn``: PyHealth's batches over that loader) and ``True``
    sorts anyway; each says so in one warning, and the record names the features under
    ``padding_dependent``. A method whose values depend on the batch anyway (``dependent``) is not
    probed. A resumed run is cut as recorded, without a probe. A probe that passes measures those
    samples only, not the model: one whose dependence shows only on later data is sorted (the
    interpreters still check every batch they would trim, and warn)."""
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
    if recorded and recorded.get("sorted") and batch_tokens is None:  # resume as it was cut
        dataset, _, collate = source
        batches = LengthSortedBatches(dataset, model, batch_size=recorded.get("batch_size"),
                                      batch_tokens=recorded.get("batch_tokens"), collate_fn=collate,
                                      window=recorded.get("window", SORT_WINDOW))
        return batches, _sorted_record(batches, dependent, recorded.get("padding_dependent"))
    return _probed(dataloader, source, model, sort_by_length == "auto", batch_tokens, dependent, explain)


def _probed(dataloader: Any, source: tuple[Any, int, Any], model: Any, auto: bool, batch_tokens: int | None,
            dependent: bool, explain: Callable[[dict[str, Any]], Any] | None
            ) -> tuple[DatasetBatches, dict[str, Any]]:
    """A fresh run's batches once the method is probed for padding dependence: length-sorted, or
    (``auto`` and values that depend on padding) the loader's own."""
    dataset, size, collate = source
    first = [dataset[i] for i in range(min(PADDING_PROBE_SAMPLES, len(dataset)))]
    found = padding_dependence(model, collate, first, explain) if first and not dependent else None
    padding = None if found is None else list(found.report.features)
    if found is not None:
        if auto and batch_tokens is not None:
            raise ValueError(f"batch_tokens cuts batches sorted by length, which changes the values here: "
                             f"{found.why()}; pass sort_by_length=True to sort anyway")
        warnings.warn(padding_note(found, auto), stacklevel=4)
        if auto:
            return LoaderOrderBatches(dataset, size, collate, first), \
                _loader_record(dataloader, dependent, None, padding)
    if batch_tokens is None and size == 1:
        batch_tokens = COHORT_BATCH_TOKENS.get(model_device(model).type, COHORT_BATCH_TOKENS["cuda"])
    batches = LengthSortedBatches(dataset, model, batch_size=None if batch_tokens else size, batch_tokens=batch_tokens,
                                  collate_fn=collate, first=first)
    return batches, _sorted_record(batches, dependent, padding)


def _sorted_record(batches: LengthSortedBatches, dependent: bool, padding: list[str] | None = None
                   ) -> dict[str, Any]:
    """``run.json``'s ``batching`` of length-sorted batches; for values that depend on the batch
    (the method's, or the model's ``padding`` dependence: the features) also their order and padding."""
    record = {"sorted": True, "batch_size": batches.batch_size, "batch_tokens": batches.batch_tokens,
              "window": batches.window}
    if dependent or padding is not None:
        record.update(batch_dependent=True, order="sorted by length in windows (ties by position)",
                      padding=f"each batch padded by {_name(batches.collate_fn)} to its own longest")
    if padding is not None:
        record["padding_dependent"] = padding
    return record


def _loader_record(dataloader: Any, dependent: bool, recorded: dict[str, Any] | None,
                   padding: list[str] | None = None) -> dict[str, Any]:
    """``run.json``'s ``batching`` of a loader's own batches: ``{"sorted": False}``; for values that
    depend on the batch (the method's, or the model's ``padding`` dependence: the features, also kept
    from a ``recorded`` run resumed) also the loader's batch size, order and padding (a resumed run
    must cut the same batches: a loader of another batch size is refused)."""
    if padding is None and recorded:
        padding = recorded.get("padding_dependent")
    if not dependent and padding is None:
        return {"sorted": False}
    size = getattr(dataloader, "batch_size", None)
    if recorded and recorded.get("batch_dependent") and recorded.get("batch_size") != size:
        why = ("its model's output depends on padding" if padding is not None else
               "its method's values depend on the batch")
        raise ValueError(f"this run was attributed in the loader's batches of {recorded.get('batch_size')} patients "
                         f"and {why}; resume it with a loader of that batch size, not {size}")
    collate = getattr(dataloader, "collate_fn", None)
    record = {"sorted": False, "batch_dependent": True, "batch_size": size, "order": "the loader's, as given",
              "padding": f"each batch as the loader pads it ({_name(collate)})" if collate else
              "each batch as the loader gives it"}
    if padding is not None:
        record["padding_dependent"] = padding
    return record


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
