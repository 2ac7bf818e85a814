"""`StreamService`: what one serving replica does, without Ray (the Ray layer is `tta.serve.app`).

One source model and a template adapter per replica; per-stream adapted state in a bounded
`tta.engine.StreamPool` (forked from the template, frozen tensors shared, least recently used idle
stream evicted to the `FolderStateStore` and restored on its next request). On top of the pool:

- checkpoints: a stream's adapted state is written to the store every `checkpoint_every` steps, so a
  replica that dies loses at most that many steps of it; a new replica restores every stream from
  the store on its first request (the pool reads the store when a stream is not in memory);
- per-stream FIFO with micro-batching: requests of one stream are queued in arrival order and run one
  batch at a time; requests queued together are concatenated into one adaptation batch up to
  `max_batch_images` (a request is never split, its predictions come back in its own order);
- per-stream metrics: batches, images, adaptation steps, resets, mean prediction entropy, evictions,
  restores and checkpoints (`stats`); `on_batch` hooks publish them (Ray metrics in `tta.serve.app`).

Compute runs on one worker thread per replica (torch threads per replica: `threads`), so streams of
one replica take turns on its cores and several replicas do not fight over the same threads.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tta.errors import TTAError
from tta.serve.codec import InputSpec, RequestError, check_batch
from tta.serve.config import ServeConfig, check_stream_id

#: per-stream statistics kept for at most this many streams per replica (least recently used dropped)
MAX_STATS = 10_000


def build_adapter(config: ServeConfig) -> Any:
    """The template adapter of `config` (card, adapter, preset, overrides, card defaults such as the
    AdaNPC memory), as `tta run` builds it; every name is checked here, before any serving starts."""
    import argparse

    import tta
    from tta.adapters import get_adapter_class
    from tta.cli.run import card_defaults
    from tta.models import load
    from tta.plugins import import_plugin

    for module in config.plugins:
        import_plugin(module)
    overrides = get_adapter_class(config.adapter).Config.parse_assignments(config.overrides)
    kwargs = card_defaults(config.adapter, overrides, argparse.Namespace(model=config.card_name()))
    return tta.adapt(load(config.card_name()), config.adapter, preset=config.preset, **kwargs)


@dataclass
class StreamStats:
    """What a replica measured on one stream since it first saw it (steps: the adapter's own count,
    restored with its state)."""

    batches: int = 0
    images: int = 0
    requests: int = 0
    steps: int = 0
    resets: int = 0
    entropy_sum: float = 0.0
    checkpoints: int = 0
    checkpoint_step: int = 0
    restored_step: int | None = None  # the step count the stream had when this replica first loaded it

    @property
    def mean_entropy(self) -> float | None:
        return self.entropy_sum / self.images if self.images else None

    def as_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "images": self.images, "requests": self.requests, "steps": self.steps,
                "resets": self.resets, "mean_entropy": self.mean_entropy, "checkpoints": self.checkpoints,
                "checkpoint_step": self.checkpoint_step, "restored_step": self.restored_step}


@dataclass
class _Pending:
    batch: np.ndarray
    future: asyncio.Future
    received: float = field(default_factory=time.perf_counter)


class StreamService:
    """One replica's streams (see the module docstring). Async API for the serving layer:
    `submit` (enqueue, returns a ticket once the request holds its place in the stream's order),
    `result` (await the ticket's predictions), `predict` (both), `reset`; sync: `stats`, `health`,
    `checkpoint_all`."""

    def __init__(self, config: ServeConfig, replica: int = 0, adapter: Any = None,
                 on_batch: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        import torch

        from tta.engine import FolderStateStore, StreamPool

        torch.set_num_threads(config.threads)
        self.config = config
        self.replica = replica
        template = adapter if adapter is not None else build_adapter(config)
        self.output_kind = getattr(template, "output_kind", "logits")
        self.state_dir = config.state_path()
        self.pool = StreamPool(template, device=config.device, max_streams=config.max_streams,
                               store=FolderStateStore(self.state_dir))
        from tta.models import get_card

        card = get_card(config.card_name())
        self.input = InputSpec(tuple(card.input_size), config.max_request_images, config.max_request_bytes)
        self.on_batch = on_batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tta-replica-{replica}")
        self._queues: dict[str, deque[_Pending]] = {}
        self._draining: set[str] = set()
        self._tickets: dict[int, asyncio.Future] = {}
        self._ticket_ids = itertools.count()
        self._stats: OrderedDict[str, StreamStats] = OrderedDict()
        self.started = time.time()
        self.batches = 0
        self.closed = False

    # ------------------------------------------------------------------ async API
    async def submit(self, stream_id: str, batch: np.ndarray) -> int:
        """Queue `batch` (float32 N, C, H, W in [0, 1], checked by `tta.serve.codec`) for stream
        `stream_id`; returns the ticket `result` takes. Order within a stream: the order of `submit`."""
        check_stream_id(stream_id)
        batch = self._check(batch)
        queue = self._queues.setdefault(stream_id, deque())
        if len(queue) >= self.config.max_pending_per_stream:
            raise RequestError(f"stream {stream_id!r} has {len(queue)} requests queued (limit "
                               f"{self.config.max_pending_per_stream}); wait for its answers", 429)
        loop = asyncio.get_running_loop()
        pending = _Pending(batch, loop.create_future())
        queue.append(pending)
        ticket = next(self._ticket_ids)
        self._tickets[ticket] = pending.future
        if stream_id not in self._draining:
            self._draining.add(stream_id)
            loop.create_task(self._drain(stream_id))
        return ticket

    async def result(self, ticket: int) -> dict[str, Any]:
        future = self._tickets.get(ticket)
        if future is None:
            raise RequestError(f"unknown ticket {ticket}", 404)
        try:
            return await future
        finally:
            self._tickets.pop(ticket, None)

    async def predict(self, stream_id: str, batch: np.ndarray) -> dict[str, Any]:
        return await self.result(await self.submit(stream_id, batch))

    async def reset(self, stream_id: str) -> dict[str, Any]:
        """Return the stream to the source state (queued behind its pending requests)."""
        check_stream_id(stream_id)
        loop = asyncio.get_running_loop()
        while self._queues.get(stream_id):  # let its queued requests finish first
            await asyncio.sleep(0.005)
        return await loop.run_in_executor(self._executor, self._reset, stream_id)

    # ------------------------------------------------------------------ the worker
    def _check(self, batch: Any) -> np.ndarray:
        """The same checks as an HTTP body (shape, dtype, range): the handle API and the HTTP path
        reach a stream's state only with a batch that fits the model."""
        if not isinstance(batch, np.ndarray):
            raise RequestError(f"a batch is a numpy array, got {type(batch).__name__}")
        return check_batch(batch, self.input)

    async def _drain(self, stream_id: str) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queues[stream_id]
        try:
            while queue:
                group = [queue.popleft()]
                images = len(group[0].batch)
                while queue and images + len(queue[0].batch) <= self.config.max_batch_images:
                    group.append(queue.popleft())
                    images += len(group[-1].batch)
                x = group[0].batch if len(group) == 1 else np.concatenate([p.batch for p in group])
                try:
                    out = await loop.run_in_executor(self._executor, self._step, stream_id, x, len(group))
                except BaseException as exc:  # noqa: BLE001 - the requests get the error, the queue goes on
                    for p in group:
                        if not p.future.done():
                            p.future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
                    continue
                start = 0
                for p in group:
                    n = len(p.batch)
                    if not p.future.done():
                        p.future.set_result({
                            "stream": stream_id, "step": out["step"], "replica": self.replica,
                            "merged_requests": len(group),
                            "predictions": [{"class": int(c), "confidence": float(v)}
                                            for c, v in zip(out["classes"][start:start + n],
                                                            out["confidence"][start:start + n])],
                        })
                    start += n
        finally:
            self._draining.discard(stream_id)
            if not queue:
                self._queues.pop(stream_id, None)
            else:  # a request arrived after the loop saw the queue empty
                self._draining.add(stream_id)
                loop.create_task(self._drain(stream_id))

    def _stats_of(self, stream_id: str) -> StreamStats:
        stats = self._stats.get(stream_id)
        if stats is None:
            stats = self._stats[stream_id] = StreamStats()
            while len(self._stats) > MAX_STATS:
                self._stats.popitem(last=False)
        self._stats.move_to_end(stream_id)
        return stats

    def _step(self, stream_id: str, x: np.ndarray, requests: int = 1) -> dict[str, Any]:
        """Predict-and-adapt on one (micro-)batch of one stream; runs on the worker thread."""
        import torch

        stats = self._stats_of(stream_id)
        adapter = self.pool.get(stream_id)  # created, or restored from the store
        if stats.restored_step is None:
            stats.restored_step = stats.checkpoint_step = int(adapter.counters.get("steps", 0))
        out = self.pool.step(stream_id, torch.from_numpy(x)).float()
        probs = out if self.output_kind == "probs" else out.softmax(1)
        confidence, classes = probs.max(1)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1)
        steps = int(self.pool.get(stream_id).counters.get("steps", 0))
        stats.batches += 1
        stats.requests += requests
        stats.images += len(x)
        stats.steps = steps
        stats.entropy_sum += float(entropy.sum())
        self.batches += 1
        checkpointed = steps - stats.checkpoint_step >= self.config.checkpoint_every
        if checkpointed:
            self.pool.checkpoint(stream_id)
            stats.checkpoints += 1
            stats.checkpoint_step = steps
        if self.on_batch is not None:
            self.on_batch(stream_id, {"images": len(x), "steps": steps, "entropy": float(entropy.mean()),
                                      "resident": len(self.pool), "checkpointed": checkpointed})
        return {"step": steps, "classes": classes.numpy(), "confidence": confidence.numpy()}

    def _reset(self, stream_id: str) -> dict[str, Any]:
        stats = self._stats_of(stream_id)
        self.pool.reset(stream_id)
        self.pool.checkpoint(stream_id)  # the reset survives a crash too
        stats.resets += 1
        stats.steps = stats.checkpoint_step = int(self.pool.get(stream_id).counters.get("steps", 0))
        return {"stream": stream_id, "step": stats.steps, "resets": stats.resets, "replica": self.replica}

    # ------------------------------------------------------------------ sync API
    def stats(self, stream_id: str | None = None) -> dict[str, Any]:
        """One stream's statistics, or the replica's (pool counts and every stream it has seen)."""
        if stream_id is not None:
            check_stream_id(stream_id)
            stats = self._stats.get(stream_id)
            if stats is None:
                raise RequestError(f"stream {stream_id!r} has not been seen by replica {self.replica}", 404)
            return {"stream": stream_id, "replica": self.replica, **stats.as_dict()}
        return {"replica": self.replica, "batches": self.batches, **self.pool.stats(),
                "streams": {sid: s.as_dict() for sid, s in self._stats.items()}}

    def health(self) -> dict[str, Any]:
        return {"replica": self.replica, "status": "ok", "resident_streams": len(self.pool),
                "queued_requests": sum(len(q) for q in self._queues.values()),
                "uptime_s": round(time.time() - self.started, 1), "state_dir": str(self.state_dir)}

    def checkpoint_all(self) -> int:
        """Write every resident stream's state to the store (graceful shutdown); returns how many."""
        n = 0
        for sid in self.pool.stream_ids:
            try:
                self.pool.checkpoint(sid)
                n += 1
            except TTAError:
                continue
        return n

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._executor.shutdown(wait=True)  # the running batch finishes first
        self.checkpoint_all()


__all__ = ["MAX_STATS", "StreamService", "StreamStats", "build_adapter"]
