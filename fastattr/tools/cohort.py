"""Cohort-scale attribution: every batch of a dataloader, streamed to a run folder as checksummed
shards (:mod:`fastattr.tools.store`), resumable after any interruption, and shardable across
processes with torch.distributed.
"""
from __future__ import annotations

import os
import queue
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from fastattr.core.checks import check_count
from fastattr.core.targets import resolve_targets
from fastattr.interpret.base import Attributor, Interpreter
from fastattr.interpret.batches import batch_size, move_batch, select_samples
from fastattr.interpret.features import FeatureBatch, FeatureLayout, model_device
from fastattr.tools.store import (Attributions, RunLockedError, ShardStore, load_attributions, read_run_info,
                                  record_timing, run_info, write_run_info)

__all__ = ["Attributions", "CohortDataset", "LengthSortedBatches", "attribute_dataset", "load_attributions"]

ID_KEYS = ("patient_id", "visit_id")


def _ids(batch: dict[str, Any], size: int, index: int) -> dict[str, list[str]]:
    ids = {k: [str(v) for v in batch[k]] for k in ID_KEYS if isinstance(batch.get(k), (list, tuple))}
    if "patient_id" not in ids:
        ids["patient_id"] = [f"batch{index}:{i}" for i in range(size)]
    return ids


def _attribute_with_retry(interpreter: Any, batch: dict[str, Any], index: int, kwargs: dict[str, Any]):
    """Attribute ``batch``; on CUDA out-of-memory, retry in halves down to one patient. Returns
    ``[(start, stop, result, predictions or None), ...]``; the predictions are the interpreter's
    own (``last_predictions``), so the model runs no extra forward for them."""
    size = batch_size(batch)
    try:
        result = interpreter.attribute(**kwargs, **batch)
        return [(0, size, result, getattr(interpreter, "last_predictions", None))]
    except torch.cuda.OutOfMemoryError as exc:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if size == 1:
            raise RuntimeError(f"batch {index} ran out of memory even one patient at a time") from exc
    half = (size + 1) // 2
    parts = []
    for start, stop in ((0, half), (half, size)):
        sub = _attribute_with_retry(interpreter, select_samples(batch, slice(start, stop)), index, kwargs)
        parts += [(start + a, start + b, r, p) for a, b, r, p in sub]
    return parts


def _concat(parts: list[tuple]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, Any]:
    """``(attributions, convergence delta or None, (probabilities, targets) or None)`` of the parts."""
    results = [p[2] for p in parts]
    pairs = [r if isinstance(r, tuple) else (r, None) for r in results]
    attributions = {k: torch.cat([a[k] for a, _ in pairs]) for k in pairs[0][0]}
    delta = torch.cat([d for _, d in pairs]) if pairs[0][1] is not None else None
    preds = [p[3] for p in parts]
    predictions = None if any(p is None for p in preds) else \
        (torch.cat([p[0] for p in preds]), torch.cat([p[1] for p in preds]))
    return attributions, delta, predictions


def _inputs(model: Any, batch: dict[str, Any], attributions: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a table needs beside each attribution: the token ids (``input/<key>``, token features)
    and a bool tensor of the attribution's shape that is ``False`` at padding (``keep/<key>``)."""
    features = FeatureBatch.from_batch(model, batch)
    out = {}
    for key, attr in attributions.items():
        if key not in features.keys:
            continue
        if features.layouts[key].token and features.value(key).shape == attr.shape:
            out[f"input/{key}"] = features.value(key).detach().cpu().contiguous()
        try:
            out[f"keep/{key}"] = features.keep(key, attr.shape)
        except RuntimeError:  # a result that does not broadcast with the mask: every entry is kept
            pass
    return out


def _predictions(model: Any, batch: dict[str, Any], target: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted probabilities ``[B, C]`` and the class each patient is explained for, for an
    interpreter that does not report its own (one extra forward)."""
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k in model.feature_keys})
    logits = out["logit"].reshape(out["logit"].shape[0], -1)
    prob = out["y_prob"] if "y_prob" in out else logits
    targets = resolve_targets(target, logits, logits.shape[0], logits.shape[1], logits.device)
    return prob.detach().float().reshape(prob.shape[0], -1), targets


def _distributed() -> tuple[int, int, bool]:
    """(rank, world size, whether this call started the process group, as it does under torchrun)."""
    if not dist.is_available():
        return 0, 1, False
    started = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        started = True
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), started
    return 0, 1, started


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _on_every_rank(step: Any) -> Any:
    """Run ``step()`` on every rank; when it fails on any, every rank raises (the failing one its
    own error), instead of the others waiting at the next barrier for a rank that left."""
    error, result = None, None
    try:
        result = step()
    except Exception as exc:
        error = exc
    if dist.is_available() and dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        failed = torch.tensor([error is not None], dtype=torch.int32, device=device)
        dist.all_reduce(failed)
        if error is None and int(failed.item()):
            error = RunLockedError("another rank of this run could not start (see its error); nothing was written")
    if error is not None:
        raise error
    return result


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
            total += int((value != 0).sum()) if not value.is_floating_point() else (value.shape[0] if value.dim() else 1)
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
        index = 0
        for start in range(0, len(self.dataset), self.window):
            samples = [self.dataset[i] for i in range(start, min(start + self.window, len(self.dataset)))]
            for members in self._cut([_sample_length(self.model, sample) for sample in samples]):
                positions = [start + i for i in members]
                yield positions, None if skip is not None and skip(index) else \
                    self.collate_fn([samples[i] for i in members])
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


def _batching(dataloader: Any, model: Any, sort_by_length: Any, batch_tokens: int | None,
              recorded: dict[str, Any] | None) -> tuple[Any, dict[str, Any]]:
    """The batches to attribute (a loader, or :class:`LengthSortedBatches` over its dataset) and
    how they were made (stored in ``run.json``, and reused when a run is resumed with defaults)."""
    if not (sort_by_length is True or sort_by_length is False or sort_by_length == "auto"):
        raise ValueError(f"sort_by_length must be 'auto', True or False; got {sort_by_length!r}")
    check_count("batch_tokens", batch_tokens, optional=True)
    if isinstance(dataloader, LengthSortedBatches):
        return dataloader, {"sorted": True, "batch_size": dataloader.batch_size,
                            "batch_tokens": dataloader.batch_tokens, "window": dataloader.window}
    if sort_by_length == "auto" and recorded is not None and not recorded.get("sorted"):
        sort_by_length = False  # a run begun in the loader's order resumes in it
    if sort_by_length is False:
        if batch_tokens is not None:
            raise ValueError("batch_tokens applies only when batches are sorted by length (sort_by_length='auto' "
                             "or True)")
        return dataloader, {"sorted": False}
    source = _sort_source(dataloader) if model is not None else "the interpreter has no .model"
    if isinstance(source, str):
        if sort_by_length is True:
            raise ValueError(f"sort_by_length=True needs a DataLoader over a map-style dataset, in order: {source}")
        warnings.warn(f"attribute_dataset: batches run in the loader's order, not sorted by length, because {source}; "
                      "pass sort_by_length=False to say that is intended", stacklevel=3)
        return dataloader, {"sorted": False}
    dataset, size, collate = source
    window = SORT_WINDOW
    if recorded and recorded.get("sorted") and batch_tokens is None:  # resume as it was cut
        size, batch_tokens = recorded.get("batch_size"), recorded.get("batch_tokens")
        window = recorded.get("window", SORT_WINDOW)
    elif batch_tokens is None and size == 1:
        batch_tokens = COHORT_BATCH_TOKENS.get(model_device(model).type, COHORT_BATCH_TOKENS["cuda"])
    batches = LengthSortedBatches(dataset, model, batch_size=None if batch_tokens else size,
                                  batch_tokens=batch_tokens, collate_fn=collate, window=window)
    return batches, {"sorted": True, "batch_size": batches.batch_size, "batch_tokens": batches.batch_tokens,
                     "window": batches.window}


def _in_order(dataloader: Iterable[dict[str, Any]]) -> Iterator[tuple[list[int], dict[str, Any]]]:
    """A loader's batches with their positions: 0, 1, ... in the order it yields samples."""
    seen = 0
    for batch in dataloader:
        size = batch_size(batch)
        yield list(range(seen, seen + size)), batch
        seen += size


def _tensors(batch: dict[str, Any]) -> Iterator[torch.Tensor]:
    for value in batch.values():
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, torch.Tensor):
                yield v


def attribute_dataset(interpreter: Interpreter | Attributor, dataloader: Iterable[dict[str, Any]], out: str | Path, *,
                      save_probabilities: bool = True, resume: bool = True, progress: bool | None = None,
                      sort_by_length: bool | str = "auto", batch_tokens: int | None = None,
                      vocab: Mapping[str, Any] | None = None,
                      annotations: Mapping[str, Mapping[str, str]] | None = None,
                      **attribute_kwargs: Any) -> Path:
    """Attribute every batch of ``dataloader`` with ``interpreter`` and stream the results to ``out``.

    Args:
        interpreter: a fastattr interpreter (``IntegratedGradients``, ``CheferRelevance``) or any
            object with ``attribute(**kwargs, **batch)`` and ``model``.
        dataloader: batches as dicts (a PyHealth dataloader, ``fastattr.tools.cohort.CohortDataset``
            through a ``DataLoader``, or :class:`LengthSortedBatches`). Its order must be the same
            on every run and rank (``shuffle=False``); ids come from ``patient_id`` / ``visit_id``.
            Batches are moved to the model's device.
        out: a folder; created if needed.
        save_probabilities: also store the model's predicted probabilities and the class each
            patient was explained for (``target``), as the interpreter's own forward gave them.
        resume: continue a run found in ``out`` (verifying its shards by checksum and redoing any
            corrupt one); ``False`` refuses to touch a folder that already holds a run.
        progress: progress bar with patients/s and ETA (``None``: only on a terminal).
        sort_by_length: ``"auto"`` (default): when ``dataloader`` is a ``DataLoader`` over a
            map-style dataset in order (``shuffle=False``, no sampler of its own), its dataset is
            rebatched through its ``collate_fn`` as :class:`LengthSortedBatches`: batches of
            ``dataloader.batch_size`` similar-length samples (a loader of batch size 1 gets
            batches of ``COHORT_BATCH_TOKENS`` padded positions for the model's device), each
            padded only to its own longest; any other loader runs in its own order, with one
            warning saying why. ``True``: the same, but a loader that cannot be sorted is an
            error; ``False``: the loader's batches as they are. Results keep their dataset
            positions in the store, so readers see the same run whichever way it was batched.
        batch_tokens: padded positions per sorted batch instead of a count of samples.
        vocab: ``{feature: {code: id} or [name by id]}`` to decode codes in tables and reports;
            by default each processor's ``code_vocab`` (PyHealth's), else codes are shown as ids.
            Stored in the run's ``run.json`` with the method, the model and how the batches were
            cut (a resumed run is cut the same way), so the folder is self-describing. Each
            shard also stores the token ids (``input/<key>``) and where the padding is
            (``keep/<key>``) beside the attributions.
        annotations: ``{feature: {code name: label}}`` marked in reports (e.g. known risk
            factors; the synthetic cohort's planted codes and distractors).
        **attribute_kwargs: passed to ``interpreter.attribute`` (``steps``, ``target_class_idx``,
            ``return_convergence_delta``...). With ``return_convergence_delta`` the delta is stored.

    Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is started (NCCL on GPUs, gloo on
    CPUs) and rank r takes batches r, r + W, ...: the same batches as a single process, so the
    results are identical; every rank writes its own shards and rank 0 merges the manifest.
    A batch that runs out of CUDA memory is retried in halves before failing.
    """
    model = getattr(interpreter, "model", None)
    out = Path(out)
    rank, world, started = _distributed()
    out.mkdir(parents=True, exist_ok=True)
    info = read_run_info(out) if resume else None
    # how an interrupted run's batches were cut (runs written before run.json said so were in order)
    recorded = None if info is None else info.get("batching", {"sorted": False})
    dataloader, batching = _batching(dataloader, model, sort_by_length, batch_tokens, recorded)
    device = model_device(model) if isinstance(model, torch.nn.Module) else None
    store = ShardStore(out, rank, world)
    _on_every_rank(store.lock)
    try:
        done = _on_every_rank(lambda: store.recover(resume))
        if rank == 0 and model is not None:
            write_run_info(out, run_info(interpreter, model, vocab, annotations, attribute_kwargs, batching), resume)
        _barrier()  # every rank has read the previous state before any rank writes
        timing = _run(interpreter, model, dataloader, store, done, rank, world, device, progress,
                      save_probabilities, attribute_kwargs)
        _barrier()
        if rank == 0:
            store.merge()
            if model is not None:
                record_timing(out, timing)
        _barrier()
        if progress is not False and timing["patients"]:
            share = timing["attributing_s"] / max(timing["wall_s"], 1e-9)
            tqdm.write(f"attributed {timing['patients']} patients in {timing['wall_s']:.1f} s "
                       f"({timing['patients'] / max(timing['wall_s'], 1e-9):.0f} patients/s); {share:.0%} of the time "
                       "inside the interpreter" + (f" (rank {rank})" if world > 1 else ""))
    finally:
        store.release()
        if started:
            dist.destroy_process_group()
    return out


class _Prefetch:
    """The next batches, read, collated and moved to the device in a thread of their own while the
    current batch is attributed (``depth`` batches ahead). On CUDA a batch's host tensors are
    pinned and copied on a side stream without blocking; the consumer's stream waits for that
    copy before using them. Yields ``(index, positions, batch or None)`` in order; an error in
    the thread is raised in the consumer."""

    _END = object()

    def __init__(self, batches: Iterator[tuple[list[int], Any]], device: torch.device | None,
                 wanted: Any, depth: int = 2) -> None:
        self.batches, self.device, self.wanted = batches, device, wanted
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.stream = torch.cuda.Stream(device) if device is not None and device.type == "cuda" else None
        self.thread = threading.Thread(target=self._fill, name="fastattr-prefetch", daemon=True)
        self.thread.start()

    def _move(self, batch: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        if self.stream is None:
            return (move_batch(batch, self.device) if self.device is not None else batch), None
        with torch.cuda.stream(self.stream):
            moved = move_batch(batch, self.device, pinned=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return moved, event

    def _fill(self) -> None:
        try:
            for index, (positions, batch) in enumerate(self.batches):
                if self.stop.is_set():
                    return
                event = None
                if batch is not None and self.wanted(index):
                    batch, event = self._move(batch)
                self._put((index, positions, batch, event))
            self._put(self._END)
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(exc)

    def _put(self, item: Any) -> None:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Iterator[tuple[int, list[int], Any]]:
        while True:
            item = self.queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            index, positions, batch, event = item
            if event is not None:
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(event)
                for value in _tensors(batch):
                    value.record_stream(stream)  # the copy stream's memory stays until this stream is done
            yield index, positions, batch

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


class _Writer:
    """Shards written in order by a thread of their own while the next batches are attributed:
    :meth:`ShardStore.write` there (shard fsynced, then its journal line), so a shard is listed
    only once durable, as before. At most ``depth`` shards wait; a write error is raised in the
    producer at its next :meth:`put` or at :meth:`close`, which waits for every queued shard."""

    def __init__(self, store: ShardStore, depth: int = 2) -> None:
        self.store, self.error = store, None
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._drain, name="fastattr-writer", daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is None:
                try:
                    self.store.write(*item)
                except BaseException as exc:
                    self.error = exc

    def put(self, *item: Any) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(item)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def _run(interpreter: Any, model: Any, dataloader: Any, store: ShardStore, done: dict[int, dict], rank: int,
         world: int, device: torch.device | None, progress: bool | None, save_probabilities: bool,
         attribute_kwargs: dict[str, Any]) -> dict[str, float]:
    """This rank's batches: attribute each one not done and write its shard, with the next batch
    read and the previous shard written while the current one is attributed. Returns the wall
    time, the time inside the interpreter (results on the host) and the patients attributed."""
    try:
        total_patients = len(dataloader.dataset)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        total_patients = None
    bar = tqdm(total=total_patients, unit="patient", desc=f"attributing (rank {rank}/{world})" if world > 1 else
               "attributing", disable=None if progress is None else not progress, smoothing=0.1)
    if isinstance(dataloader, LengthSortedBatches):
        batches = dataloader.with_positions(skip=lambda i: i % world != rank and i not in done)
    else:
        batches = _in_order(dataloader)
    mine = lambda index: index % world == rank and index not in done  # noqa: E731
    start, attributing, patients = time.perf_counter(), 0.0, 0
    source, writer = _Prefetch(batches, device, mine), _Writer(store)
    try:
        for index, positions, batch in source:
            size = len(positions)
            if batch is None:  # another rank's batch, not collated here
                bar.update(size)
                continue
            ids = _ids(batch, size, index)
            if index in done:
                if done[index]["ids"] != ids:
                    raise ValueError(f"batch {index} holds other patients than in the interrupted run; the "
                                     "dataloader must keep its order (shuffle=False) to resume")
                bar.update(size)
                continue
            if not mine(index):
                bar.update(size)
                continue
            began = time.perf_counter()
            attributions, delta, predictions = _concat(_attribute_with_retry(interpreter, batch, index,
                                                                             attribute_kwargs))
            tensors = {f"attr/{k}": v.detach().contiguous().cpu() for k, v in attributions.items()}
            if delta is not None:
                tensors["convergence_delta"] = delta.detach().contiguous().cpu()
            if model is not None and hasattr(model, "feature_keys"):
                tensors.update(_inputs(model, batch, attributions))
            if save_probabilities and model is not None:
                if predictions is None:
                    predictions = _predictions(model, batch, attribute_kwargs.get("target_class_idx"))
                tensors["probability"] = predictions[0].cpu().contiguous()
                tensors["target"] = predictions[1].cpu().contiguous()
            attributing += time.perf_counter() - began
            patients += size
            writer.put(index, tensors, ids, positions)
            bar.update(size)
    finally:
        source.close()
        try:
            writer.close()  # every finished batch is written (and listed) before anything else happens
        finally:
            bar.close()
    return {"wall_s": time.perf_counter() - start, "attributing_s": attributing, "patients": patients}


class CohortDataset(torch.utils.data.Dataset):
    """A :class:`fastattr.tools.synthetic.SyntheticCohort` (or the patients ``indices`` of it) as a
    map-style dataset of patient dicts; ``patient_id`` is ``P`` and the patient's cohort index.

    Items hold the codes padded to the cohort's ``max_codes`` (so the default collate works);
    pass ``collate_fn=CohortDataset.collate`` to pad each batch only to its own longest patient.
    """

    def __init__(self, cohort: Any, indices: Sequence[int] | None = None) -> None:
        self.cohort = cohort
        self.indices = list(range(len(cohort))) if indices is None else [int(i) for i in indices]
        if any(not 0 <= i < len(cohort) for i in self.indices):
            raise IndexError(f"indices must lie in [0, {len(cohort)}) (the cohort's patients)")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        patient = self.indices[index]
        row = self.cohort.batch([patient])
        return {"patient_id": f"P{patient:08d}", "codes": row["codes"][0], "label": row["label"][0]}

    @staticmethod
    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        """Stack items, then cut the codes after the batch's last non-padding column."""
        batch = torch.utils.data.default_collate(items)
        codes = batch["codes"]
        used = (codes != 0).any(dim=0).nonzero()
        batch["codes"] = codes[:, : int(used.max()) + 1 if len(used) else 1]
        return batch
