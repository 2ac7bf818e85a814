"""`StreamPool`: several independent adapted streams (cameras, users) over one shared source model."""

from __future__ import annotations

import os
import threading
from collections.abc import Hashable
from pathlib import Path

import torch

from tta.adapters.base import Adapter, read_state
from tta.engine.runner import autocast, resolve_amp, resolve_device
from tta.errors import InvalidInputError


class StreamPool:
    """Adapted state keyed by stream id; each stream adapts on its own data only.

    The first `step` of a stream id creates its state with `adapter.fork()`: an independent copy of
    the adapter's *current* state that shares the frozen source tensors (weights adaptation never
    changes), so N streams cost N copies of the adapted tensors, not N models. The adapter handed
    to the pool is the template and is never stepped. Calls for one stream id are serialised by a
    per-stream lock; different streams run concurrently from different threads.
    """

    def __init__(self, adapter: Adapter, *, device: str | torch.device = "auto", amp: bool | str = False) -> None:
        if not isinstance(adapter, Adapter):
            raise InvalidInputError(f"StreamPool needs a tta Adapter (tta.adapt(...)), got {type(adapter).__name__}")
        self.device = resolve_device(device)
        self._amp = resolve_amp(amp, self.device)
        self.template = adapter.to(self.device)
        self._states: dict[Hashable, Adapter] = {}
        self._locks: dict[Hashable, threading.Lock] = {}
        self._pool_lock = threading.Lock()

    def _entry(self, stream_id: Hashable) -> tuple[Adapter, threading.Lock]:
        try:
            hash(stream_id)
        except TypeError:
            raise InvalidInputError(f"stream id must be hashable, got {type(stream_id).__name__}") from None
        with self._pool_lock:
            state = self._states.get(stream_id)
            if state is None:
                state = self._states[stream_id] = self.template.fork()
                self._locks[stream_id] = threading.Lock()
            return state, self._locks[stream_id]

    def step(self, stream_id: Hashable, x: torch.Tensor) -> torch.Tensor:
        """Predict-and-adapt on batch `x` with stream `stream_id`'s state; returns its outputs."""
        adapter, lock = self._entry(stream_id)
        with lock:
            if isinstance(x, torch.Tensor):
                x = x.to(self.device, non_blocking=True)
            with autocast(self.device, self._amp):
                return adapter(x).detach()

    def reset(self, stream_id: Hashable) -> None:
        """Return stream `stream_id` to the source state (its optimizer state too)."""
        adapter, lock = self._entry(stream_id)
        with lock:
            adapter.reset()

    def save(self, stream_id: Hashable, path: str | os.PathLike[str]) -> Path:
        """Write stream `stream_id`'s adapted state (atomic; see `Adapter.save`)."""
        adapter, lock = self._entry(stream_id)
        with lock:
            return adapter.save(path)

    def load(self, stream_id: Hashable, path: str | os.PathLike[str]) -> None:
        """Load a state written by `save` into stream `stream_id` (created when new).

        The rule of `Adapter.load`: the whole file is checked before any of it is applied, and a
        state whose frozen tensors (shared by every stream) differ from this pool's source model is
        rejected instead of being written into the shared tensors.
        """
        adapter, lock = self._entry(stream_id)
        state = read_state(path)
        with lock:
            adapter.load_saved(state, where=str(path))

    def get(self, stream_id: Hashable) -> Adapter:
        """The adapter holding stream `stream_id`'s state (created when new)."""
        return self._entry(stream_id)[0]

    def remove(self, stream_id: Hashable) -> None:
        """Forget stream `stream_id` (its state is dropped)."""
        with self._pool_lock:
            self._states.pop(stream_id, None)
            self._locks.pop(stream_id, None)

    @property
    def stream_ids(self) -> list[Hashable]:
        with self._pool_lock:
            return list(self._states)

    def __contains__(self, stream_id: object) -> bool:
        return stream_id in self._states

    def __len__(self) -> int:
        return len(self._states)

