"""The cohort run's two helper threads: the next batches read, collated and moved to the device
ahead of use (:class:`Prefetch`), and finished shards written in order behind it (:class:`ShardWriter`)."""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import torch

from fastattr.interpret.batches import move_batch
from fastattr.runs.writer import ShardStore


def _tensors(batch: dict[str, Any]) -> Iterator[torch.Tensor]:
    for value in batch.values():
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, torch.Tensor):
                yield v


class Prefetch:
    """The next batches, read, collated and moved to the device in a thread of their own while the
    current batch is attributed (``depth`` batches ahead). On CUDA a batch's host tensors are
    pinned and copied on a side stream without blocking; the consumer's stream waits for that
    copy before using them. Takes ``(positions, batch or None, own shapes or None)`` and yields
    ``(index, positions, batch or None, own shapes or None)`` in order; an error in the thread is
    raised in the consumer."""

    _END = object()

    def __init__(self, batches: Iterator[tuple[list[int], Any, Any]], device: torch.device | None,
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
            for index, (positions, batch, alone) in enumerate(self.batches):
                if self.stop.is_set():
                    return
                event = None
                if batch is not None and self.wanted(index):
                    batch, event = self._move(batch)
                self._put((index, positions, batch, alone, event))
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

    def __iter__(self) -> Iterator[tuple[int, list[int], Any, Any]]:
        while True:
            item = self.queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            index, positions, batch, alone, event = item
            if event is not None:
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(event)
                for value in _tensors(batch):
                    value.record_stream(stream)  # the copy stream's memory stays until this stream is done
            yield index, positions, batch, alone

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


class ShardWriter:
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
