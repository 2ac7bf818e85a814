"""StreamPool: independent adapted states per stream id over one shared source model."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

import tta
from engine_helpers import single_thread  # noqa: F401  (fixture)
from engine_helpers import assert_same_tensors, domain_data, model_tensors, tiny_cnn
from tta.engine import StreamPool
from tta.errors import StateMismatchError

pytestmark = pytest.mark.usefixtures("single_thread")


def batches(seed: int, shift: float, n: int = 4):
    x, _ = domain_data(16 * n, shift, seed)
    return list(x.split(16))


def test_streams_diverge_and_equal_running_alone():
    template = tta.adapt(tiny_cnn(), "tent")
    alone_a, alone_b = template.fork(), template.fork()
    pool = StreamPool(template, device="cpu")
    data_a, data_b = batches(1, 0.0), batches(2, 0.4)
    for xa, xb in zip(data_a, data_b):  # interleaved steps
        out_a = pool.step("cam-a", xa)
        out_b = pool.step("cam-b", xb)
        assert torch.equal(out_a, alone_a(xa))
        assert torch.equal(out_b, alone_b(xb))
    state_a, state_b = model_tensors(pool.get("cam-a")), model_tensors(pool.get("cam-b"))
    assert_same_tensors(state_a, model_tensors(alone_a))
    assert_same_tensors(state_b, model_tensors(alone_b))
    assert any(not torch.equal(state_a[k], state_b[k]) for k in state_a)  # different data, different state
    # the template never adapts; frozen source weights are shared, not copied
    assert template.counters["steps"] == 0
    conv = pool.get("cam-a").model[0].weight
    assert conv.data_ptr() == template.model[0].weight.data_ptr() == pool.get("cam-b").model[0].weight.data_ptr()
    assert sorted(pool.stream_ids) == ["cam-a", "cam-b"] and len(pool) == 2


def test_reset_touches_one_stream_only():
    template = tta.adapt(tiny_cnn(), "tent")
    source = model_tensors(template)
    pool = StreamPool(template, device="cpu")
    for xa, xb in zip(batches(1, 0.0, 2), batches(2, 0.4, 2)):
        pool.step("a", xa)
        pool.step("b", xb)
    before_b = model_tensors(pool.get("b"))
    pool.reset("a")
    assert_same_tensors(model_tensors(pool.get("a").model), {k[len("model."):]: v for k, v in source.items()})
    assert_same_tensors(model_tensors(pool.get("b")), before_b)


def test_save_load_round_trip(tmp_path):
    template = tta.adapt(tiny_cnn(), "tent")
    pool = StreamPool(template, device="cpu")
    data = batches(3, 0.2, 3)
    for x in data[:2]:
        pool.step("a", x)
    path = pool.save("a", tmp_path / "a.pt")
    pool.load("restored", path)
    assert_same_tensors(model_tensors(pool.get("restored")), model_tensors(pool.get("a")))
    assert pool.get("restored").optimizer.state_dict()["state"].keys() == pool.get("a").optimizer.state_dict()["state"].keys()
    # the restored stream continues exactly like the original
    assert torch.equal(pool.step("restored", data[2]), pool.step("a", data[2]))
    assert_same_tensors(model_tensors(pool.get("restored")), model_tensors(pool.get("a")))


def test_load_rejects_state_from_other_source_weights(tmp_path):
    other = StreamPool(tta.adapt(tiny_cnn(seed=9), "tent"), device="cpu")
    other.step("a", batches(1, 0.0, 1)[0])
    path = other.save("a", tmp_path / "other.pt")
    pool = StreamPool(tta.adapt(tiny_cnn(seed=1), "tent"), device="cpu")
    shared = copy.deepcopy(model_tensors(pool.template))
    with pytest.raises(StateMismatchError, match="frozen tensor"):
        pool.load("x", path)
    assert_same_tensors(model_tensors(pool.template), shared)  # shared source untouched


def test_concurrent_streams_from_threads_equal_sequential():
    template = tta.adapt(tiny_cnn(), "tent")
    alone = {s: template.fork() for s in range(3)}
    pool = StreamPool(template, device="cpu")
    data = {s: batches(10 + s, 0.1 * s, 3) for s in range(3)}
    outputs: dict[int, list[torch.Tensor]] = {}

    def worker(s):
        outputs[s] = [pool.step(s, x) for x in data[s]]

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in range(3):
        expected = [alone[s](x) for x in data[s]]
        for got, exp in zip(outputs[s], expected):
            assert torch.equal(got, exp)
