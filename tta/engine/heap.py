"""Give freed heap memory back to the operating system during long runs.

On Linux with glibc, PyTorch's CPU tensors come from ``malloc``. An adapter whose step allocates
tensors of a different size at every batch (those that adapt on a selected subset of the batch:
ROID, DeYO, EATA, SAR) leaves freed chunks scattered over the heap, and glibc keeps them instead of
returning them to the system, so the resident memory of a long stream climbs for hours although
nothing is leaked. Measured on the default card: ROID over 300,000 images grew from 1.95 to 2.66 GiB
resident (BENCHMARKS.md, "Soak"); after 250 ROID steps one ``malloc_trim(0)`` took a 1.74 GiB
process back to 0.79 GiB. Trimming every 100 batches ends that run at 0.95 GiB and keeps it 0.1-0.3
GiB lower throughout; it does not stop the climb between trims (a step's live tensors land on ever
more pages of the fragmented heap).

`HeapTrimmer` calls glibc's ``malloc_trim(0)`` once every N calls of `tick`; `run_stream` and
`StreamPool` tick it once per batch. Where ``malloc_trim`` does not exist (macOS, Windows, musl) it
does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import threading
import time
from collections.abc import Callable

from tta.errors import ConfigError

#: batches between two trims in `run_stream` and `StreamPool` (one trim of a ~2 GiB CPU process
#: took ~0.16 s in the ROID soak run: 0.2% of the run at this interval)
DEFAULT_TRIM_EVERY = 100


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (looked up once)."""
    try:
        fn = getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        return None
    if fn is not None:
        fn.argtypes = [ctypes.c_size_t]
        fn.restype = ctypes.c_int
    return fn


def trim_heap() -> bool:
    """Return the free memory at the top and inside the heap to the system (``malloc_trim(0)``).

    True when memory was released, False when none could be or the C library has no such call."""
    fn = _malloc_trim()
    return bool(fn(0)) if fn is not None else False


def heap_trim_available() -> bool:
    """Whether this process's C library can trim its heap (glibc)."""
    return _malloc_trim() is not None


def check_trim_every(every: int | None) -> int:
    """`every` as a count of calls (0 = never); None means never too."""
    if every is None:
        return 0
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ConfigError(f"trim_heap_every must be an integer >= 0 (0 = never), got {every!r}")
    return every


class HeapTrimmer:
    """Calls `trim_heap` on every `every`-th `tick` (0 or None: never). Thread-safe.

    ``trims`` and ``seconds`` count the trims made and the time they took."""

    def __init__(self, every: int | None = DEFAULT_TRIM_EVERY) -> None:
        every = check_trim_every(every)
        self.every = every if heap_trim_available() else 0
        self.trims = 0
        self.seconds = 0.0
        self._calls = 0
        self._lock = threading.Lock()

    def tick(self) -> None:
        if not self.every:
            return
        with self._lock:
            self._calls += 1
            due = self._calls % self.every == 0
        if due:
            t0 = time.perf_counter()
            trim_heap()
            with self._lock:
                self.trims += 1
                self.seconds += time.perf_counter() - t0


__all__ = ["DEFAULT_TRIM_EVERY", "HeapTrimmer", "check_trim_every", "heap_trim_available", "trim_heap"]
