"""Serving without Ray: request decoding, the config, and one replica's `StreamService` (per-stream
state, eviction/restore, checkpoints, micro-batching, order, bad input). The Ray layer: test_serve_ray.py."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import sys

import numpy as np
import pytest
import torch

import tta
from engine_helpers import single_thread  # noqa: F401  (fixture)
from engine_helpers import tiny_cnn
from tta.engine import FolderStateStore, StreamPool
from tta.errors import ConfigError
from tta.serve import ServeConfig, replica_of
from tta.serve.codec import InputSpec, RequestError, check_batch, decode_body, encode_npy
from tta.serve.service import StreamService

SPEC = InputSpec((3, 32, 32), max_images=16, max_bytes=2**20)


def batch(seed: int, n: int = 8, shift: float = 0.0) -> np.ndarray:
    g = np.random.default_rng(seed)
    return np.clip(g.random((n, 3, 32, 32), dtype=np.float32) * 0.6 + shift, 0, 1).astype(np.float32)


def png(array_hwc: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array_hwc).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------- codec
def test_npy_bodies_nchw_nhwc_uint8_and_float():
    x = batch(0)
    out, stream = decode_body(encode_npy(x), "application/x-npy", SPEC)
    assert stream is None and out.dtype == np.float32 and np.array_equal(out, x)
    u8 = (x * 255).astype(np.uint8)
    nhwc = u8.transpose(0, 2, 3, 1)
    out, _ = decode_body(encode_npy(nhwc), "application/octet-stream", SPEC)
    assert np.array_equal(out, u8.astype(np.float32) / 255)


def test_encoded_images_and_json_bodies():
    rgb = (batch(1, 2).transpose(0, 2, 3, 1) * 255).astype(np.uint8)
    out, _ = decode_body(png(rgb[0]), "image/png", SPEC)
    assert out.shape == (1, 3, 32, 32) and np.array_equal(out[0], rgb[0].transpose(2, 0, 1) / np.float32(255))
    doc = {"stream": "cam-7", "images": [base64.b64encode(png(im)).decode() for im in rgb]}
    out, stream = decode_body(json.dumps(doc).encode(), "application/json", SPEC)
    assert stream == "cam-7" and out.shape == (2, 3, 32, 32)
    doc = {"stream": "cam-7", "npy": base64.b64encode(encode_npy(batch(2, 3))).decode()}
    out, _ = decode_body(json.dumps(doc).encode(), "application/json; charset=utf-8", SPEC)
    assert out.shape == (3, 3, 32, 32)
    grey = InputSpec((1, 32, 32))
    out, _ = decode_body(png(rgb[0]), "image/png", grey)  # converted to the card's channels
    assert out.shape == (1, 1, 32, 32)


@pytest.mark.parametrize("body, ctype, status, words", [
    (b"", "application/x-npy", 400, "empty"),
    (b"\x89PNG\r\n\x1a\nnot really", "image/png", 400, "could not be decoded"),
    (b"hello", "text/plain", 415, "unsupported Content-Type"),
    (b"{not json", "application/json", 400, "not valid JSON"),
    (b'{"images": ["%%%"]}', "application/json", 400, "not valid base64"),
    (b'{"images": [], "stream": "a"}', "application/json", 400, "non-empty list"),
    (b'{"stream": 5, "npy": ""}', "application/json", 400, "must be a string"),
    (b"x" * (2**20 + 1), "application/x-npy", 413, "exceeds the limit"),
    (b"\x93NUMPY garbage", "application/x-npy", 400, "not a readable .npy"),
])
def test_bad_bodies_are_clear_request_errors(body, ctype, status, words):
    with pytest.raises(RequestError, match=words) as info:
        decode_body(body, ctype, SPEC)
    assert info.value.status == status


@pytest.mark.parametrize("array, words", [
    (np.zeros((3, 32, 32), np.float32), "single image"),
    (np.zeros((2, 3, 28, 28), np.float32), "do not fit the model's input"),
    (np.zeros((2, 1, 32, 32), np.float32), "do not fit the model's input"),
    (np.zeros((0, 3, 32, 32), np.float32), "empty batch"),
    (np.zeros((2, 3, 32, 32), np.int64), "dtype int64 is not supported"),
    (np.full((2, 3, 32, 32), 255.0, np.float32), r"must lie in \[0, 1\]"),
    (np.full((2, 3, 32, 32), np.nan, np.float32), "NaN"),
    (np.zeros((17, 3, 32, 32), np.uint8), "exceed the limit of 16"),
])
def test_bad_arrays_are_rejected(array, words):
    with pytest.raises(RequestError, match=words):
        check_batch(array, SPEC)


def test_object_arrays_are_never_unpickled():
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(RequestError, match="object arrays are refused"):
        decode_body(buf.getvalue(), "application/x-npy", SPEC)


def test_wrong_size_image_is_rejected_not_resized():
    with pytest.raises(RequestError, match="the model takes 32x32"):
        decode_body(png(np.zeros((64, 64, 3), np.uint8)), "image/png", SPEC)


# ---------------------------------------------------------------------- config
def test_config_checks_and_loopback_only(tmp_path):
    assert ServeConfig().host == "127.0.0.1"
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        ServeConfig(host=host)
    for bad in ({"host": "0.0.0.0"}, {"host": "192.0.2.1"}, {"host": "example.com"}, {"replicas": 0},
                {"max_streams": -1}, {"checkpoint_every": 0}, {"port": 70000}, {"threads": 1.5},
                {"app_name": "a b"}, {"cpus_per_replica": -1}):
        with pytest.raises(ConfigError):
            ServeConfig(**bad)
    assert ServeConfig(state_dir=str(tmp_path)).state_path() == tmp_path
    assert ServeConfig(adapter="bn").state_path().name == "resnet20-fmnist-bn"


def test_routing_is_stable_and_spreads_streams():
    ids = [f"cam-{i}" for i in range(200)]
    first = [replica_of(s, 2) for s in ids]
    assert first == [replica_of(s, 2) for s in ids]  # a stable hash, not Python's salted hash()
    assert 60 < sum(first) < 140
    assert {replica_of(s, 1) for s in ids} == {0}


# ---------------------------------------------------------------------- the replica's service
def make_service(tmp_path, adapter, **changes) -> StreamService:
    config = ServeConfig(state_dir=str(tmp_path / "states"), **changes)
    return StreamService(config, adapter=adapter)


def run(coro):
    return asyncio.run(coro)


def reference_pool(adapter, tmp_path, name="ref", **kw) -> StreamPool:
    return StreamPool(adapter, device="cpu", store=FolderStateStore(tmp_path / name), **kw)


def classes_of(out: torch.Tensor) -> list[int]:
    return out.softmax(1).argmax(1).tolist()


def test_streams_through_the_service_equal_the_in_process_pool(tmp_path, single_thread):
    """Two interleaved streams: the same predictions as the in-process pool (no cross-stream leakage)."""
    torch.manual_seed(0)
    template = tta.adapt(tiny_cnn(), "tent", lr=1e-2)
    service = make_service(tmp_path, template.fork())
    pool = reference_pool(template.fork(), tmp_path)

    async def go():
        outs = []
        for k in range(4):
            for sid, shift in (("a", 0.0), ("b", 0.3)):
                x = batch(10 * k + (sid == "b"), shift=shift)
                got = await service.predict(sid, x)
                want = pool.step(sid, torch.from_numpy(x))
                outs.append((got, want, sid, k))
        return outs

    for got, want, sid, k in run(go()):
        assert [p["class"] for p in got["predictions"]] == classes_of(want)
        conf = want.softmax(1).max(1).values
        assert np.allclose([p["confidence"] for p in got["predictions"]], conf.numpy(), atol=1e-6)
        assert got["step"] == k + 1 and got["stream"] == sid
    stats = service.stats("a")
    assert stats["batches"] == 4 and stats["steps"] == 4 and stats["images"] == 32 and stats["mean_entropy"] > 0


def test_eviction_and_restore_through_the_service_equal_the_unbounded_pool(tmp_path, single_thread):
    torch.manual_seed(0)
    template = tta.adapt(tiny_cnn(), "tent", lr=1e-2)
    service = make_service(tmp_path, template.fork(), max_streams=1)
    pool = reference_pool(template.fork(), tmp_path)  # unbounded

    async def go():
        for k in range(3):
            for i, sid in enumerate(("a", "b", "c")):
                x = batch(100 * k + i, shift=0.2 * i)
                got = await service.predict(sid, x)
                assert [p["class"] for p in got["predictions"]] == classes_of(pool.step(sid, torch.from_numpy(x)))
                assert got["step"] == k + 1

    run(go())
    assert service.pool.evictions >= 6 and service.pool.restores >= 6
    assert len(service.pool) == 1


def test_checkpoints_every_k_steps_and_a_new_replica_resumes_from_them(tmp_path, single_thread):
    """A replica that dies (no close) loses at most K steps; the next one restores from the store."""
    torch.manual_seed(0)
    template = tta.adapt(tiny_cnn(), "tent", lr=1e-2)
    service = make_service(tmp_path, template.fork(), checkpoint_every=2)
    reference = template.fork()
    xs = [batch(k) for k in range(6)]

    async def first():
        return [await service.predict("cam", x) for x in xs[:5]]

    answers = run(first())
    assert [a["step"] for a in answers] == [1, 2, 3, 4, 5]
    assert service.stats("cam")["checkpoint_step"] == 4
    for x in xs[:4]:
        reference(torch.from_numpy(x))  # the checkpointed state: 4 steps
    # the replica dies here (no close(), no eviction): step 5 is lost, steps 1-4 are in the store
    restarted = make_service(tmp_path, template.fork(), checkpoint_every=2)
    got = run(restarted.predict("cam", xs[5]))
    assert got["step"] == 5  # 4 restored + 1
    assert restarted.stats("cam")["restored_step"] == 4
    assert [p["class"] for p in got["predictions"]] == classes_of(reference(torch.from_numpy(xs[5])))


def test_queued_requests_of_a_stream_are_merged_in_order(tmp_path, single_thread):
    """Micro-batching: requests queued together form one batch in arrival order; each gets its slice."""
    torch.manual_seed(0)
    template = tta.adapt(tiny_cnn(), "tent", lr=1e-2)
    service = make_service(tmp_path, template.fork(), max_batch_images=12)
    reference = template.fork()
    xs = [batch(k, n=4) for k in range(5)]

    async def go():
        tickets = [await service.submit("s", x) for x in xs]  # queued before the worker runs
        return [await service.result(t) for t in tickets]

    answers = run(go())
    # all five were queued before the stream's worker ran: batches of at most 12 images, [0, 1, 2] and [3, 4]
    assert [a["merged_requests"] for a in answers] == [3, 3, 3, 2, 2]
    assert [a["step"] for a in answers] == [1, 1, 1, 2, 2]
    expected = classes_of(reference(torch.from_numpy(np.concatenate(xs[:3])))) + \
        classes_of(reference(torch.from_numpy(np.concatenate(xs[3:]))))
    assert [p["class"] for a in answers for p in a["predictions"]] == expected


def test_bad_input_touches_no_stream(tmp_path, single_thread):
    template = tta.adapt(tiny_cnn(), "tent", lr=1e-2)
    service = make_service(tmp_path, template.fork(), max_pending_per_stream=2)

    async def go():
        await service.predict("ok", batch(0))
        before = service.stats("ok")
        for bad in (np.zeros((2, 3, 16, 16), np.float32), np.full((2, 3, 32, 32), 9.0, np.float32), "pixels"):
            with pytest.raises(RequestError):
                await service.predict("ok", bad)
        for bad_id in ("", "a\nb", "x" * 201, 7):
            with pytest.raises(ConfigError):
                await service.predict(bad_id, batch(1))
        assert service.stats("ok") == before and service.pool.stream_ids == ["ok"]
        tickets = [await service.submit("busy", batch(k)) for k in range(2)]
        with pytest.raises(RequestError, match="requests queued") as info:
            await service.submit("busy", batch(3))
        assert info.value.status == 429
        for t in tickets:
            await service.result(t)

    run(go())


def test_reset_and_graceful_close_checkpoint_the_streams(tmp_path, single_thread):
    template = tta.adapt(tiny_cnn(), "tent", lr=1e-2)
    service = make_service(tmp_path, template.fork(), checkpoint_every=100)

    async def go():
        for k in range(3):
            await service.predict("r", batch(k))
        await service.predict("kept", batch(9))
        out = await service.reset("r")
        assert out["resets"] == 1
        return await service.predict("r", batch(5))

    answer = run(go())
    fresh = template.fork()  # the source state
    assert [p["class"] for p in answer["predictions"]] == classes_of(fresh(torch.from_numpy(batch(5))))
    step_after_reset = answer["step"]
    assert step_after_reset == 4  # the step count goes on: a reset restores weights, not the count
    service.close()  # graceful: every resident stream written to the store
    assert set(FolderStateStore(tmp_path / "states").keys()) == {"r", "kept"}


def test_serve_command_without_ray_names_the_extra(monkeypatch, capsys):
    from tta.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "Ray Serve" in err and 'pip install "tta-runtime[serve]"' in err


@pytest.mark.parametrize("argv, words", [
    (["serve", "--host", "0.0.0.0"], "loopback"),
    (["serve", "--replicas", "0"], "replicas must be an integer >= 1"),
    (["serve", "--adapter", "no-such-adapter"], "no-such-adapter"),
    (["serve", "--model", "no-such-card"], "no-such-card"),
    (["serve", "--set", "bogus=1"], "bogus"),
    (["serve", "--duration", "-1"], "--duration"),
])
def test_serve_command_rejects_bad_settings_before_starting_ray(argv, words, capsys):
    pytest.importorskip("ray.serve")
    import ray

    from tta.cli import main

    assert main(argv) == 2
    assert words in capsys.readouterr().err
    assert not ray.is_initialized()
