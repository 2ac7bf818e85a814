"""FrameBatcher: single frames -> micro-batches -> per-frame predictions in submission order."""

from __future__ import annotations

import copy
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
