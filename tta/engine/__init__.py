"""Streaming engine: run adapters over streams, micro-batch single frames, keep per-stream state.

- `run_stream(adapter, stream, ...) -> RunResult`: predict-and-adapt over a stream of batches with
  background prefetch, device placement, optional AMP, reset policies and per-domain metrics.
- `FrameBatcher`: single frames from any thread -> micro-batches -> per-frame predictions in order.
- `StreamPool`: independent adapted states keyed by stream id over one shared source model;
  bounded (LRU) with evicted states in a `StateStore` (`FolderStateStore`, `MemoryStateStore`).
- `CollapseGuard` / `GuardConfig`: health signals, rollback and reset for long streams
  (``run_stream(..., guard=True)``).
- `HeapTrimmer` / `trim_heap`: give freed heap memory back to the system on long CPU runs (both
  `run_stream` and `StreamPool` trim every 100 batches by default).
"""

from tta.engine.frames import FrameBatcher
from tta.engine.guard import CollapseGuard, GuardConfig
from tta.engine.heap import HeapTrimmer, trim_heap
from tta.engine.metrics import RunResult
from tta.engine.pool import StreamPool
from tta.engine.store import FolderStateStore, MemoryStateStore, StateStore
from tta.engine.runner import resolve_amp, resolve_device, run_stream, seed_everything

__all__ = [
    "CollapseGuard", "FolderStateStore", "FrameBatcher", "GuardConfig", "HeapTrimmer", "MemoryStateStore", "RunResult",
    "StateStore", "StreamPool", "resolve_amp", "resolve_device", "run_stream", "seed_everything", "trim_heap",
]
