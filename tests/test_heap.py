"""Heap trimming on long runs (`tta.engine.heap`): freed memory goes back to the system."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import tta
from engine_helpers import single_thread  # noqa: F401  (fixture)
from engine_helpers import tensor_stream, tiny_cnn
from tta.engine import HeapTrimmer, StreamPool, run_stream
from tta.engine.heap import heap_trim_available
from tta.errors import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")
glibc = pytest.mark.skipif(not heap_trim_available(), reason="the C library has no malloc_trim (not glibc)")


@pytest.mark.parametrize("bad", [-1, 1.5, True, "10"])
def test_trim_interval_is_validated(bad):
    with pytest.raises(ConfigError, match="trim_heap_every"):
        HeapTrimmer(bad)
    with pytest.raises(ConfigError, match="trim_heap_every"):
        run_stream(tta.adapt(tiny_cnn(), "bn"), tensor_stream({"a": 32}, batch_size=32), device="cpu",
                   progress=False, trim_heap_every=bad)
    with pytest.raises(ConfigError, match="trim_heap_every"):
        StreamPool(tta.adapt(tiny_cnn(), "bn"), device="cpu", trim_heap_every=bad)


@glibc
def test_trimmer_trims_on_every_nth_tick_and_never_at_zero():
    every3 = HeapTrimmer(3)
    for _ in range(7):
        every3.tick()
    assert every3.trims == 2 and every3.seconds > 0
    for never in (HeapTrimmer(0), HeapTrimmer(None)):
        for _ in range(5):
            never.tick()
        assert never.trims == 0 and never.seconds == 0.0


@glibc
def test_run_stream_and_pool_trim_at_their_interval():
    stream = tensor_stream({"a": 96, "b": 96}, batch_size=32)  # 6 batches
    result = run_stream(tta.adapt(tiny_cnn(), "tent"), stream, device="cpu", progress=False, trim_heap_every=2)
    assert result.batches == 6 and result.heap_trims == 3
    assert result.to_dict()["heap_trims"] == 3
    off = run_stream(tta.adapt(tiny_cnn(), "tent"), stream, device="cpu", progress=False, trim_heap_every=0)
    assert off.heap_trims == 0 and off.heap_trim_seconds == 0.0
    # trimming changes no prediction
    a = run_stream(tta.adapt(tiny_cnn(), "tent"), stream, device="cpu", progress=False, keep_predictions=True,
                   seed=0, trim_heap_every=1)
    b = run_stream(tta.adapt(tiny_cnn(), "tent"), stream, device="cpu", progress=False, keep_predictions=True,
                   seed=0, trim_heap_every=0)
    assert torch.equal(a.predictions, b.predictions)

    pool = StreamPool(tta.adapt(tiny_cnn(), "tent"), device="cpu", trim_heap_every=2)
    x = torch.rand(8, 3, 16, 16)
    for k in range(5):
        pool.step(k % 2, x)
    assert pool._trimmer.trims == 2


@glibc
def test_trim_returns_fragmented_free_memory_to_the_system():
    # In a fresh process: fill the heap with 64 KiB tensors (under glibc's mmap threshold, so they
    # come from the heap), free all but every 16th (the survivors pin the heap: free() alone cannot
    # shrink it), then trim. The freed pages must leave the resident set.
    code = textwrap.dedent("""
        import torch
        from tta.engine.heap import trim_heap
        def rss():
            for line in open("/proc/self/status"):
                if line.startswith("VmRSS"):
                    return int(line.split()[1]) / 1024
        blocks = [torch.ones(16 * 1024 - 64) for _ in range(4096)]    # ~256 MiB, pages touched
        keep = blocks[::16]
        del blocks
        before = rss()
        trim_heap()
        print(before, rss(), len(keep))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    before, after, _ = (float(v) for v in out.stdout.split())
    assert before - after > 150, f"resident memory {before:.0f} MiB before the trim, {after:.0f} MiB after"
