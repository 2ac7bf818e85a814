"""StreamPool: independent adapted states per stream id over one shared source model."""

from __future__ import annotations

import copy
import io
import threading
import time

import pytest
import torch

import tta
from engine_helpers import single_thread  # noqa: F401  (fixture)
from engine_helpers import assert_same_tensors, domain_data, model_tensors, tiny_cnn
from tta.engine import FolderStateStore, MemoryStateStore, StreamPool
from tta.engine.store import stream_key
from tta.errors import ConfigError, StateMismatchError, StreamRemovedError

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


# ------------------------------------------------------------------------------------------------
# bounded pool: LRU eviction to a state store, restore on the next call, no adaptation lost


def test_bounded_pool_evicts_and_restores_without_losing_adaptation(tmp_path):
    template = tta.adapt(tiny_cnn(), "tent")
    alone = {s: template.fork() for s in "abcde"}
    store = FolderStateStore(tmp_path / "states")
    pool = StreamPool(template, device="cpu", max_streams=2, store=store)
    data = {s: batches(20 + i, 0.1 * i, 4) for i, s in enumerate("abcde")}
    for step in range(4):  # round robin over 5 streams through 2 slots: every call restores
        for s in "abcde":
            assert torch.equal(pool.step(s, data[s][step]), alone[s](data[s][step]))
            assert len(pool) <= 2
    assert pool.evictions >= 15 and pool.restores >= 15
    for s in "abcde":  # adapted tensors, optimizer state and counters all came back
        assert_same_tensors(model_tensors(pool.get(s)), model_tensors(alone[s]))
        assert pool.get(s).counters["steps"] == 4
    assert set(store.keys()) >= {"a", "b", "c"}
    assert "a" in pool and "zzz" not in pool


def test_evicted_states_leave_out_the_shared_frozen_weights():
    template = tta.adapt(tiny_cnn(), "tent")
    store = MemoryStateStore()
    pool = StreamPool(template, device="cpu", max_streams=1, store=store)
    pool.step("a", batches(1, 0.0, 1)[0])
    pool.step("b", batches(2, 0.0, 1)[0])  # evicts "a"
    state = torch.load(io.BytesIO(store.read("a")), weights_only=True)
    assert "model.0.weight" not in state and "model.1.weight" in state  # conv frozen, BN affine adapted


def test_default_store_is_a_temporary_folder_removed_on_close():
    pool = StreamPool(tta.adapt(tiny_cnn(), "bn"), device="cpu", max_streams=1)
    root = pool.store.root
    pool.step("a", batches(1, 0.0, 1)[0])
    pool.step("b", batches(2, 0.0, 1)[0])
    assert (root / "a.state").is_file()
    pool.close()
    assert not root.exists()


def test_stream_ids_that_are_not_safe_names_get_hashed_keys(tmp_path):
    assert stream_key("cam-3") == "cam-3"
    keys = {stream_key(s) for s in ("../etc/passwd", "a b", 3, "3", (1, 2), "h-x", "x" * 200)}
    assert len(keys) == 7 and all(k.startswith("h-") for k in keys - {"3"})
    store = FolderStateStore(tmp_path)
    with pytest.raises(ConfigError, match="keys"):
        store.write("../escape", b"x")
    pool = StreamPool(tta.adapt(tiny_cnn(), "bn"), device="cpu", max_streams=1, store=store)
    for sid in ("../etc/passwd", ("cam", 1)):
        pool.step(sid, batches(1, 0.0, 1)[0])
    pool.step("c", batches(1, 0.0, 1)[0])
    assert all(p.parent == tmp_path for p in tmp_path.iterdir())


def test_a_corrupted_stored_state_is_a_clear_error_and_is_kept(tmp_path):
    store = FolderStateStore(tmp_path)
    pool = StreamPool(tta.adapt(tiny_cnn(), "tent"), device="cpu", max_streams=1, store=store)
    pool.step("a", batches(1, 0.0, 1)[0])
    pool.step("b", batches(2, 0.0, 1)[0])
    good = store.read("a")
    store.write("a", good[: len(good) // 2])
    with pytest.raises(StateMismatchError, match="stream 'a'"):
        pool.step("a", batches(3, 0.0, 1)[0])
    assert store.read("a") == good[: len(good) // 2]  # nothing overwritten or deleted
    store.write("a", good)
    pool.step("a", batches(3, 0.0, 1)[0])  # the stream goes on once the state is readable again


def test_a_failing_store_keeps_the_stream_in_memory():
    class Full(MemoryStateStore):
        def write(self, key, data):
            raise OSError("disk full")

    template = tta.adapt(tiny_cnn(), "tent")
    alone = template.fork()
    pool = StreamPool(template, device="cpu", max_streams=1, store=Full())
    x = batches(1, 0.0, 2)
    pool.step("a", x[0])
    alone(x[0])
    with pytest.warns(RuntimeWarning, match="disk full"):
        pool.step("b", x[1])
    assert "a" in pool.stream_ids and len(pool) == 2
    assert torch.equal(pool.step("a", x[1]), alone(x[1]))  # its adaptation was not lost


def test_many_producer_threads_on_a_bounded_pool_equal_single_stream_runs():
    """8 threads, each feeding 2 streams in order, through a pool of 3 slots: every output equals the
    stream run alone, in order; nothing lost or duplicated."""
    template = tta.adapt(tiny_cnn(), "tent")
    ids = list(range(16))
    data = {s: batches(100 + s, 0.05 * (s % 5), 5) for s in ids}
    alone = {s: [out for out in _run_alone(template.fork(), data[s])] for s in ids}
    pool = StreamPool(template, device="cpu", max_streams=3, store=MemoryStateStore())
    outputs: dict[int, list[torch.Tensor]] = {s: [] for s in ids}
    errors: list[BaseException] = []

    def producer(mine):
        try:
            for step in range(5):
                for s in mine:
                    outputs[s].append(pool.step(s, data[s][step]))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=producer, args=(ids[2 * t : 2 * t + 2],)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for s in ids:
        assert len(outputs[s]) == 5
        for got, exp in zip(outputs[s], alone[s]):
            assert torch.equal(got, exp)
    assert len(pool) <= 3 + 8  # never more than the slots plus the streams busy at that moment
    assert pool.evictions > 0


def _run_alone(adapter, xs):
    return [adapter(x) for x in xs]


def test_remove_during_a_running_step_waits_and_queued_calls_fail_clearly():
    """Before: remove() dropped the state while step() was running on it; the step's adaptation was
    lost and the next call silently restarted the stream from the source state."""
    gate, entered = threading.Event(), threading.Event()

    class Slow(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_cnn()

        def forward(self, x):
            entered.set()
            gate.wait(10)
            return self.net(x)

    pool = StreamPool(tta.adapt(Slow(), "bn"), device="cpu")
    x = batches(1, 0.0, 1)[0]
    results: dict[str, object] = {}

    def run(name):
        try:
            results[name] = pool.step("cam", x)
        except BaseException as exc:  # noqa: BLE001
            results[name] = exc

    first = threading.Thread(target=run, args=("first",))
    first.start()
    entered.wait(10)
    queued = threading.Thread(target=run, args=("queued",))
    queued.start()
    remover = threading.Thread(target=pool.remove, args=("cam",))
    time.sleep(0.1)
    remover.start()
    time.sleep(0.2)
    assert remover.is_alive()  # remove() waits for the running step
    gate.set()
    for t in (first, queued, remover):
        t.join(10)
    assert isinstance(results["first"], torch.Tensor)  # the running step finished normally
    # the queued call either ran before the removal or was told the stream is gone, never silently restarted
    assert isinstance(results["queued"], (torch.Tensor, StreamRemovedError))
    assert "cam" not in pool
    pool.step("cam", x)  # a new call after remove() starts a new stream, as documented
    assert pool.get("cam").counters["batches"] == 1


def test_remove_forgets_stored_states_too(tmp_path):
    pool = StreamPool(tta.adapt(tiny_cnn(), "bn"), device="cpu", max_streams=1, store=FolderStateStore(tmp_path))
    pool.step("a", batches(1, 0.0, 1)[0])
    pool.step("b", batches(1, 0.0, 1)[0])
    assert "a" in pool.store
    pool.remove("a")
    assert "a" not in pool.store and "a" not in pool


def test_pool_arguments_are_validated():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="max_streams"):
            StreamPool(tta.adapt(tiny_cnn(), "bn"), device="cpu", max_streams=bad)
    with pytest.raises(ConfigError, match="StateStore"):
        StreamPool(tta.adapt(tiny_cnn(), "bn"), device="cpu", max_streams=1, store={})
