"""Streaming engine: run adapters over streams, micro-batch single frames, keep per-stream state.

- `run_stream(adapter, stream, ...) -> RunResult`: predict-and-adapt over a stream of batches with
  background prefetch, device placement, optional AMP, reset policies and per-domain metrics.
- `FrameBatcher`: single frames from any thread -> micro-batches -> per-frame predictions in order.
- `StreamPool`: independent adapted states keyed by stream id over one shared source model;
  bounded (LRU) with evicted states in a `StateStore` (`FolderStateStore`, `MemoryStateStore`).
- `CollapseGuard` / `GuardConfig`: health signals, rollback and reset for long streams
  (``run_stream(..., guard=True)``).
"""

from tta.engine.frames import FrameBatcher
from tta.engine.guard import CollapseGuard, GuardConfig
from tta.engine.metrics import RunResult
from tta.engine.pool import StreamPool
from tta.engine.store import FolderStateStore, MemoryStateStore, StateStore
from tta.engine.runner import resolve_amp, resolve_device, run_stream, seed_everything

__all__ = [
    "CollapseGuard", "FolderStateStore", "FrameBatcher", "GuardConfig", "MemoryStateStore", "RunResult", "StateStore",
    "StreamPool", "resolve_amp", "resolve_device", "run_stream", "seed_everything",
]
