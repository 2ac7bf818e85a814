"""`StreamPool`: several independent adapted streams (cameras, users) over one shared source model."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tta.adapters.base import Adapter, read_state
from tta.adapters.state import DIGEST_KEY
from tta.engine.adapted_state import adapted_state, frozen_names, load_adapted
from tta.engine.heap import DEFAULT_TRIM_EVERY, HeapTrimmer
from tta.engine.runner import autocast, resolve_amp, resolve_device
from tta.engine.store import FolderStateStore, StateStore, stream_key
from tta.errors import ConfigError, InvalidInputError, StateMismatchError, StreamRemovedError


@dataclass
class _Entry:
    """One stream id's slot. `adapter` is None until its state is created or restored; `status`
    becomes "evicted" (state written to the store) or "removed" once the slot leaves the pool."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    adapter: Adapter | None = None
    status: str = "live"


class StreamPool:
    """Adapted state keyed by stream id; each stream adapts on its own data only.

    The first `step` of a stream id creates its state with `adapter.fork()`: an independent copy of
    the adapter's *current* state that shares the frozen source tensors (weights adaptation never
    changes), so N streams cost N copies of the adapted tensors, not N models. The adapter handed
    to the pool is the template and is never stepped. Calls for one stream id are serialised by a
    per-stream lock; different streams run concurrently from different threads.

    Bounded pool: with `max_streams`, at most that many states stay in memory; when a new stream
    needs room, the least recently used idle stream is evicted: its adapted state (everything but
    the shared frozen tensors: weights, optimizer state, RNG, counters) is written to `store`, and its
    next call restores it from there, so no adaptation is lost. `store` defaults to a temporary folder
    owned by the pool (removed by `close()`); pass a `FolderStateStore` to keep states across
    restarts, or any `StateStore` (object storage...). A stream busy in another thread is never
    evicted; if every stream is busy the pool briefly holds more than `max_streams`.

    `remove(id)` waits for a running call on that stream to finish, then forgets the stream (and its
    stored state); calls that were queued behind it raise `StreamRemovedError` instead of adapting a
    state that no longer exists. A later call with the same id starts a new stream.

    `trim_heap_every`: every N steps (over all streams) the freed heap memory goes back to the system
    (`tta.engine.heap`), so a long-running pool holds less of the memory it freed; 0 or None = never.
    """

    def __init__(
        self,
        adapter: Adapter,
        *,
        device: str | torch.device = "auto",
        amp: bool | str = False,
        max_streams: int | None = None,
        store: StateStore | None = None,
        trim_heap_every: int | None = DEFAULT_TRIM_EVERY,
    ) -> None:
        if not isinstance(adapter, Adapter):
            raise InvalidInputError(f"StreamPool needs a tta Adapter (tta.adapt(...)), got {type(adapter).__name__}")
        if max_streams is not None and (isinstance(max_streams, bool) or not isinstance(max_streams, int)
                                        or max_streams < 1):
            raise ConfigError(f"max_streams must be an integer >= 1 or None, got {max_streams!r}")
        if store is not None and not isinstance(store, StateStore):
            raise ConfigError(f"store must be a tta.engine.StateStore, got {type(store).__name__}")
        self._trimmer = HeapTrimmer(trim_heap_every)
        self.device = resolve_device(device)
        self._amp = resolve_amp(amp, self.device)
        self.template = adapter.to(self.device)
        self.max_streams = max_streams
        self._own_dir: str | None = None
        if store is None and max_streams is not None:
            self._own_dir = tempfile.mkdtemp(prefix="tta-pool-")
            store = FolderStateStore(self._own_dir)
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._own_dir, True)
        self.store = store
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()  # least recently used first
        self._pool_lock = threading.Lock()
        self._frozen_names = frozen_names(adapter)
        self.evictions = 0
        self.restores = 0

    # ------------------------------------------------------------------ slots
    def _acquire(self, stream_id: Hashable) -> _Entry:
        """The stream's slot, locked and holding its adapter (created or restored when needed)."""
        try:
            hash(stream_id)
        except TypeError:
            raise InvalidInputError(f"stream id must be hashable, got {type(stream_id).__name__}") from None
        while True:
            with self._pool_lock:
                entry = self._entries.get(stream_id)
                if entry is None:
                    entry = self._entries[stream_id] = _Entry()
                self._entries.move_to_end(stream_id)
            entry.lock.acquire()
            if entry.status == "evicted":  # written to the store while we waited: fetch it again
                entry.lock.release()
                continue
            if entry.status == "removed":
                entry.lock.release()
                raise StreamRemovedError(f"stream {stream_id!r} was removed while this call waited for it")
            if entry.adapter is None:
                try:
                    entry.adapter = self._materialise(stream_id)
                except BaseException:
                    entry.lock.release()
                    raise
            return entry

    def _materialise(self, stream_id: Hashable) -> Adapter:
        adapter = self.template.fork()
        data = None if self.store is None else self.store.read(stream_key(stream_id))
        if data is not None:
            self._load_adapted(adapter, data, f"stored state of stream {stream_id!r}")
            self.restores += 1
        return adapter

    def _adapted_bytes(self, adapter: Adapter) -> bytes:
        """The adapter's state without the shared frozen tensors, as weights-only `torch.save` bytes."""
        buf = io.BytesIO()
        torch.save(adapted_state(adapter, self._frozen_names), buf)
        return buf.getvalue()

    def _load_adapted(self, adapter: Adapter, data: bytes, what: str) -> None:
        try:
            state = torch.load(io.BytesIO(data), map_location=self.device, weights_only=True)
        except Exception as exc:  # truncated or foreign bytes
            raise StateMismatchError(f"{what} is not a readable adapter state: {exc}") from exc
        if not isinstance(state, dict):
            raise StateMismatchError(f"{what} does not hold an adapter state dict")
        load_adapted(adapter, state, self._frozen_names, what)

    def _evict_idle(self) -> None:
        """Write least recently used idle streams to the store until at most `max_streams` remain."""
        if self.max_streams is None or self.store is None:
            return
        while True:
            with self._pool_lock:
                if len(self._entries) <= self.max_streams:
                    return
                victim = None
                for sid, entry in self._entries.items():
                    if entry.lock.acquire(blocking=False):
                        victim = sid, entry
                        break
                if victim is None:
                    return  # every stream is busy: over capacity until one finishes
            sid, entry = victim
            try:
                if entry.adapter is not None and entry.status == "live":
                    try:
                        self.store.write(stream_key(sid), self._adapted_bytes(entry.adapter))
                    except Exception as exc:  # keep the stream in memory: its adaptation must not be lost
                        warnings.warn(f"StreamPool: could not store stream {sid!r} for eviction ({exc}); "
                                      "it stays in memory", RuntimeWarning, stacklevel=3)
                        with self._pool_lock:
                            self._entries.move_to_end(sid)
                        return
                    self.evictions += 1
                with self._pool_lock:
                    if self._entries.get(sid) is entry:
                        del self._entries[sid]
                    if entry.status == "live":
                        entry.status = "evicted"
                    entry.adapter = None
            finally:
                entry.lock.release()

    # ------------------------------------------------------------------ public API
    def step(self, stream_id: Hashable, x: torch.Tensor) -> torch.Tensor:
        """Predict-and-adapt on batch `x` with stream `stream_id`'s state; returns its outputs."""
        entry = self._acquire(stream_id)
        try:
            if isinstance(x, torch.Tensor):
                x = x.to(self.device, non_blocking=True)
            with autocast(self.device, self._amp):
                out = entry.adapter(x).detach()
        finally:
            entry.lock.release()
        self._evict_idle()
        self._trimmer.tick()
        return out

    def reset(self, stream_id: Hashable) -> None:
        """Return stream `stream_id` to the source state (its optimizer state too)."""
        entry = self._acquire(stream_id)
        try:
            entry.adapter.reset()
        finally:
            entry.lock.release()

    def save(self, stream_id: Hashable, path: str | os.PathLike[str]) -> Path:
        """Write stream `stream_id`'s adapted state (atomic; see `Adapter.save`)."""
        entry = self._acquire(stream_id)
        try:
            return entry.adapter.save(path)
        finally:
            entry.lock.release()

    def load(self, stream_id: Hashable, path: str | os.PathLike[str]) -> None:
        """Load a state written by `save` into stream `stream_id` (created when new).

        The rule of `Adapter.load`: the whole file is checked before any of it is applied, and a
        state whose frozen tensors (shared by every stream) differ from this pool's source model is
        rejected instead of being written into the shared tensors.
        """
        state = read_state(path)
        entry = self._acquire(stream_id)
        try:
            adapter = entry.adapter
            adapter.check_state(state, where=str(path), require_digest=True)  # the whole file, frozen tensors too
            # the frozen tensors are shared by every stream: never written (equal values checked above); the
            # digest sealed the whole file and was verified
            adapted = {k: v for k, v in state.items() if k not in self._frozen_names}
            adapted["_extra_state"] = {k: v for k, v in state["_extra_state"].items() if k != DIGEST_KEY}
            load_adapted(adapter, adapted, self._frozen_names, str(path))
        finally:
            entry.lock.release()
        self._evict_idle()

    def checkpoint(self, stream_id: Hashable) -> None:
        """Write stream `stream_id`'s adapted state to the store now (atomically, as an eviction
        would), keeping it in memory: after a crash, the stream restarts from here."""
        if self.store is None:
            raise ConfigError("checkpoint() needs a pool with a state store (store=... or max_streams=...)")
        entry = self._acquire(stream_id)
        try:
            self.store.write(stream_key(stream_id), self._adapted_bytes(entry.adapter))
        finally:
            entry.lock.release()

    def get(self, stream_id: Hashable) -> Adapter:
        """The adapter holding stream `stream_id`'s state now (created when new). In a bounded pool
        the stream may later be evicted and restored into another adapter: do not keep this one."""
        entry = self._acquire(stream_id)
        try:
            return entry.adapter
        finally:
            entry.lock.release()

    def remove(self, stream_id: Hashable) -> None:
        """Forget stream `stream_id` and its stored state, after a call running on it has finished."""
        key = stream_key(stream_id)
        while True:
            with self._pool_lock:
                entry = self._entries.get(stream_id)
                if entry is None:  # not in memory: forget the stored state (under the lock: no restore races it)
                    if self.store is not None:
                        self.store.delete(key)
                    return
            with entry.lock:  # waits for a running call on the stream
                if entry.status == "evicted":  # written out while we waited: look again
                    continue
                with self._pool_lock:
                    if self._entries.get(stream_id) is entry:
                        del self._entries[stream_id]
                    if self.store is not None:
                        self.store.delete(key)
                entry.status = "removed"
                entry.adapter = None
            return

    def close(self) -> None:
        """Drop every state; a pool-owned temporary store folder is deleted."""
        with self._pool_lock:
            self._entries.clear()
        if self._own_dir is not None:
            self._cleanup()

    @property
    def stream_ids(self) -> list[Hashable]:
        """Ids of the streams held in memory (least recently used first)."""
        with self._pool_lock:
            return list(self._entries)

    def __contains__(self, stream_id: object) -> bool:
        with self._pool_lock:
            if stream_id in self._entries:
                return True
        return self.store is not None and stream_key(stream_id) in self.store  # type: ignore[arg-type]

    def __len__(self) -> int:
        """Streams held in memory."""
        return len(self._entries)

    def stats(self) -> dict[str, Any]:
        return {"resident": len(self), "max_streams": self.max_streams, "evictions": self.evictions,
                "restores": self.restores}
