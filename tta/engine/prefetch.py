"""Background prefetch of stream batches (bounded queue, exceptions propagated, pinned memory)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from tta.streams.base import Batch

_END = object()
_POLL_S = 0.1


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Prefetcher:
    """Iterate `batches` in a daemon thread, `depth` batches ahead of the consumer.

    With `pin_memory` the producer pins each batch's tensors so the consumer's host-to-device copy
    can be asynchronous (`non_blocking=True`). An exception raised by the stream is re-raised in
    the consumer at the position where it happened. Leaving the iteration early (break, error)
    stops the producer: use it as a context manager or call `close()`.
    """

    def __init__(self, batches: Iterable[Batch], depth: int = 2, pin_memory: bool = False) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._pin = pin_memory
        self._thread = threading.Thread(target=self._produce, args=(batches,), name="tta-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, batches: Iterable[Batch]) -> None:
        try:
            for batch in batches:
                if self._pin:
                    batch = pin_batch(batch)
                if not self._put(batch):
                    return
        except BaseException as exc:  # noqa: BLE001 - delivered to the consumer thread
            self._put(_Failure(exc))
            return
        self._put(_END)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item

    def close(self) -> None:
        self._stop.set()
        # a stream blocked inside its own iterator (a camera) cannot be interrupted: don't hang on it
        self._thread.join(timeout=10.0)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pin_batch(batch: Batch) -> Batch:
    return Batch(
        batch.x.pin_memory(),
        None if batch.y is None else batch.y.pin_memory(),
        batch.domain,
        batch.sample_domains,
    )


def batches_on(batches: Iterable[Batch], device: torch.device) -> Iterator[Batch]:
    """Move each batch's images/labels to `device` (asynchronously from pinned memory)."""
    non_blocking = device.type == "cuda"
    for b in batches:
        yield Batch(
            b.x.to(device, non_blocking=non_blocking),
            None if b.y is None else b.y.to(device, non_blocking=non_blocking),
            b.domain,
            b.sample_domains,
        )
