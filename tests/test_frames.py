"""FrameBatcher: single frames -> micro-batches -> per-frame predictions in submission order."""

from __future__ import annotations

import copy
import math
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

import tta
from engine_helpers import single_thread  # noqa: F401  (fixture)
from engine_helpers import domain_data, tiny_cnn
from tta.engine import FrameBatcher
from tta.errors import BatchTooSmallError, InvalidInputError, NonFiniteInputError

pytestmark = pytest.mark.usefixtures("single_thread")


def test_map_returns_predictions_in_order_with_full_batches():
    frames, _ = domain_data(50, 0.1, seed=3)
    adapter = tta.adapt(tiny_cnn(), "tent")
    reference = copy.deepcopy(adapter)
    with FrameBatcher(adapter, batch_size=8, max_wait_ms=10_000, device="cpu") as fb:
        preds = list(fb.map(frames))
    assert fb.batch_sizes == [8] * 6 + [2]  # the tail is flushed when the input ends
    expected = torch.cat([reference(frames[i : i + 8]).argmax(1) for i in range(0, 50, 8)])
    assert preds == expected.tolist()
    assert adapter.counters["steps"] == 7


def test_max_wait_flushes_a_partial_batch():
    frames, _ = domain_data(3, 0.1, seed=4)
    adapter = tta.adapt(tiny_cnn(), "bn")
    reference = copy.deepcopy(adapter)
    with FrameBatcher(adapter, batch_size=100, max_wait_ms=300, device="cpu") as fb:
        t0 = time.monotonic()
        futures = [fb.submit(f) for f in frames]
        results = [f.result(timeout=30) for f in futures]  # resolves before close(): by max_wait
        waited = time.monotonic() - t0
        assert fb.batch_sizes == [3]
    assert waited >= 0.3
    assert results == reference(frames).argmax(1).tolist()


def test_batch_of_one_uses_the_small_batch_policy():
    frames, _ = domain_data(4, 0.1, seed=5)
    model = tiny_cnn()
    adapter = tta.adapt(copy.deepcopy(model), "bn")
    with FrameBatcher(adapter, batch_size=1, max_wait_ms=0, device="cpu", return_scores=True) as fb:
        scores = list(fb.map(frames))
    assert adapter.counters["small_batches"] == 4 and adapter.counters["steps"] == 0
    # "source" policy: source statistics, no adaptation -> the source model's outputs
    torch.testing.assert_close(torch.stack(scores), model(frames))

    strict = tta.adapt(copy.deepcopy(model), "bn", small_batch="raise")
    with FrameBatcher(strict, batch_size=1, max_wait_ms=0, device="cpu") as fb:
        future = fb.submit(frames[0])
        with pytest.raises(BatchTooSmallError, match="too small"):
            future.result(timeout=30)


def test_numpy_uint8_frames_match_float_frames():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    as_float = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    model = tiny_cnn()
    with FrameBatcher(tta.adapt(copy.deepcopy(model), "bn"), batch_size=6, max_wait_ms=1000, device="cpu") as fb:
        from_numpy = list(fb.map(list(images)))
    with FrameBatcher(tta.adapt(copy.deepcopy(model), "bn"), batch_size=6, max_wait_ms=1000, device="cpu") as fb:
        from_tensor = list(fb.map(as_float))
    assert from_numpy == from_tensor


def test_bad_frames_fail_their_own_future_only():
    frames, _ = domain_data(4, 0.1, seed=6)
    nan_frame = frames[1].clone()
    nan_frame[0, 0, 0] = float("nan")
    adapter = tta.adapt(tiny_cnn(), "bn")
    reference = copy.deepcopy(adapter)
    with FrameBatcher(adapter, batch_size=3, max_wait_ms=10_000, device="cpu") as fb:
        futures = [fb.submit(frames[0]), fb.submit(nan_frame), fb.submit(torch.rand(1, 8, 8)),
                   fb.submit(torch.zeros(3, 8, 8, dtype=torch.uint8)), fb.submit(frames[2]), fb.submit(frames[3])]
        with pytest.raises(NonFiniteInputError):
            futures[1].result(timeout=30)
        with pytest.raises(InvalidInputError, match="channel"):
            futures[2].result(timeout=30)
        with pytest.raises(InvalidInputError, match="floating point"):
            futures[3].result(timeout=30)
        good = [futures[i].result(timeout=30) for i in (0, 4, 5)]
    assert fb.batch_sizes == [3]
    assert good == reference(frames[[0, 2, 3]]).argmax(1).tolist()


def test_adapter_error_reaches_the_batch_futures_and_the_batcher_keeps_going():
    class FailsOnce(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_cnn()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("device lost")
            return self.net(x)

    frames, _ = domain_data(4, 0.1, seed=7)
    with FrameBatcher(FailsOnce(), batch_size=2, max_wait_ms=10_000, device="cpu") as fb:
        futures = [fb.submit(f) for f in frames]
        for f in futures[:2]:
            with pytest.raises(RuntimeError, match="device lost"):
                f.result(timeout=30)
        assert all(isinstance(f.result(timeout=30), int) for f in futures[2:])


def test_frames_from_many_threads_and_clean_close():
    frames, _ = domain_data(64, 0.1, seed=8)
    adapter = tta.adapt(tiny_cnn(), "bn")
    fb = FrameBatcher(adapter, batch_size=8, max_wait_ms=5, device="cpu")
    futures: list = [None] * 64

    def producer(start):
        for i in range(start, 64, 4):
            futures[i] = fb.submit(frames[i])

    threads = [threading.Thread(target=producer, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fb.close()  # processes what is still queued
    assert all(f.done() for f in futures)
    assert sum(fb.batch_sizes) == 64 and max(fb.batch_sizes) <= 8
    assert all(0 <= f.result() < 10 for f in futures)
    with pytest.raises(RuntimeError, match="closed"):
        fb.submit(frames[0])


@pytest.mark.parametrize("max_wait_ms", [math.inf, 1e13])
def test_unbounded_wait_flushes_on_full_batches_flush_and_close(max_wait_ms):
    """Before: an infinite (or > threading.TIMEOUT_MAX) wait raised OverflowError in the worker thread
    and every future hung."""
    frames, _ = domain_data(10, 0.1, seed=11)
    adapter = tta.adapt(tiny_cnn(), "bn")
    reference = copy.deepcopy(adapter)
    fb = FrameBatcher(adapter, batch_size=4, max_wait_ms=max_wait_ms, device="cpu")
    futures = [fb.submit(f) for f in frames[:6]]
    assert [f.result(timeout=30) for f in futures[:4]] == reference(frames[:4]).argmax(1).tolist()
    time.sleep(0.2)
    assert not futures[4].done()  # no time limit: the partial batch waits...
    fb.flush()  # ...until flushed
    assert [f.result(timeout=30) for f in futures[4:]] == reference(frames[4:6]).argmax(1).tolist()
    tail = [fb.submit(f) for f in frames[6:]]
    fb.close()  # close processes what is queued
    assert all(f.done() for f in tail) and fb.batch_sizes == [4, 2, 4]
    assert fb._worker is not None and not fb._worker.is_alive()


def test_bad_wait_and_batch_arguments_are_rejected():
    adapter = tta.adapt(tiny_cnn(), "bn")
    for bad in (-1, math.nan, "10", None):
        with pytest.raises(InvalidInputError, match="max_wait_ms"):
            FrameBatcher(adapter, max_wait_ms=bad, device="cpu")
    for bad in (0, 2.5, True):
        with pytest.raises(InvalidInputError, match="batch_size"):
            FrameBatcher(adapter, batch_size=bad, device="cpu")


def test_a_dying_worker_fails_every_pending_future(monkeypatch):
    adapter = tta.adapt(tiny_cnn(), "bn")
    fb = FrameBatcher(adapter, batch_size=100, max_wait_ms=math.inf, device="cpu")

    def broken(self):
        raise MemoryError("worker bug")

    monkeypatch.setattr(FrameBatcher, "_take", broken)
    frames, _ = domain_data(3, 0.1, seed=12)
    futures = [fb.submit(f) for f in frames]
    fb.flush()
    for f in futures:
        with pytest.raises(MemoryError, match="worker bug"):
            f.result(timeout=30)
    with pytest.raises(RuntimeError, match="worker failed"):
        fb.submit(frames[0])


class Recording(nn.Module):
    """The model called on every micro-batch, recording each batch it saw."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.net(x)


@pytest.mark.parametrize("name", ["source", "bn"])
def test_several_producers_order_kept_nothing_lost_or_duplicated(name):
    """4 producer threads x 40 frames through one batcher: every future resolves exactly once, each
    producer's futures resolve in its submission order, and every frame's result is what the adapter
    gives on the micro-batch it was put in (for the frozen source model: the frame alone)."""
    n_threads, per_thread = 4, 40
    frames, _ = domain_data(n_threads * per_thread, 0.1, seed=13)
    net = tiny_cnn()
    adapter = tta.adapt(Recording(copy.deepcopy(net)), name)
    fb = FrameBatcher(adapter, batch_size=8, max_wait_ms=2, device="cpu", return_scores=True)
    futures: dict[int, list] = {t: [] for t in range(n_threads)}
    done_order: dict[int, list[int]] = {t: [] for t in range(n_threads)}
    lock = threading.Lock()

    def producer(t):
        for i in range(per_thread):
            f = fb.submit(frames[t * per_thread + i])

            def record(_f, t=t, i=i):
                with lock:
                    done_order[t].append(i)

            f.add_done_callback(record)
            futures[t].append(f)
            if i % 7 == 0:
                time.sleep(0.001)

    threads = [threading.Thread(target=producer, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fb.close()
    assert sum(fb.batch_sizes) == n_threads * per_thread
    for t in range(n_threads):
        assert done_order[t] == list(range(per_thread))  # in order, each once
    results = {t * per_thread + i: futures[t][i].result() for t in range(n_threads) for i in range(per_thread)}
    seen = adapter.model.seen
    assert sum(len(b) for b in seen) == n_threads * per_thread
    # map every frame to the micro-batch row it went through (frames are distinct random images)
    rows = torch.cat(seen)
    for idx, score in results.items():
        match = (rows == frames[idx]).flatten(1).all(1).nonzero().flatten()
        assert len(match) == 1  # neither lost nor duplicated
    if name == "source":
        with torch.no_grad():
            expected = net(frames)
        for idx, score in results.items():
            torch.testing.assert_close(score, expected[idx])
    else:  # BN: the same batches through a fresh copy give the same rows
        replay = tta.adapt(copy.deepcopy(net), name)
        outputs = torch.cat([replay(b) for b in seen])
        for idx, score in results.items():
            row = int((rows == frames[idx]).flatten(1).all(1).nonzero())
            torch.testing.assert_close(score, outputs[row])
