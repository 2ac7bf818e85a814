"""`tta serve` on a local Ray instance (slow: Ray and the replicas start in ~10-40 s on a 2-core box).

The default card with TENT; streams through HTTP and the handle equal the in-process `StreamPool` on
the same batches (also through evictions and restores: one resident state per replica), the bounded
request loop stops by itself, bad input gets clear HTTP errors and touches no stream, health and Ray
metrics answer, `tta serve` itself starts, answers and stops."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")

from engine_helpers import single_thread  # noqa: E402,F401  (fixture)
from tta.serve import ServeConfig  # noqa: E402
from tta.serve.codec import encode_npy  # noqa: E402
from tta.serve.loadtest import post_npy, run_load  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batches(seed: int, n: int, size: int = 16) -> list[np.ndarray]:
    g = np.random.default_rng(seed)
    return [(g.random((size, 3, 32, 32), dtype=np.float32) * (0.3 + 0.7 * k / n)).astype(np.float32) for k in range(n)]


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def post(url: str, body: bytes, ctype: str) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_tta_serve_command_starts_answers_and_stops_by_itself(tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cli = [sys.executable, "-c", "import sys; from tta.cli import main; sys.exit(main())"]
    proc = subprocess.Popen([*cli, "serve", "--port", str(port), "--duration", "240",
                             "--state-dir", str(tmp_path / "states"), "--max-streams", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 180
        status = None
        while time.monotonic() < deadline:
            try:
                status, health = get(f"http://127.0.0.1:{port}/health")
                if status == 200:
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(1)
        assert status == 200 and health["adapter"] == "tent" and health["model"] == "resnet20-fmnist"
        x = batches(0, 1)[0]
        status, doc = post(f"http://127.0.0.1:{port}/predict?stream=cam-1", encode_npy(x), "application/x-npy")
        assert status == 200 and doc["step"] == 1 and len(doc["predictions"]) == 16
        assert {"class", "confidence"} == set(doc["predictions"][0])
    finally:
        proc.send_signal(2)  # SIGINT: delete the app (streams checkpointed) and stop Ray
        out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    assert "tta serve: tent on resnet20-fmnist" in out and "stopped" in out
    assert (tmp_path / "states" / "cam-1.state").is_file()  # checkpointed on shutdown


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from ray import serve

    from tta.serve.app import deploy
    from tta.serve.service import build_adapter

    port, metrics_port = free_port(), free_port()
    config = ServeConfig(replicas=2, max_streams=1, checkpoint_every=2, port=port, metrics_port=metrics_port,
                         state_dir=str(tmp_path_factory.mktemp("states")), app_name="tta-test")
    handle = deploy(config)
    yield config, handle, build_adapter(config)
    serve.shutdown()
    ray.shutdown()


def test_streams_equal_the_in_process_pool_through_evictions_and_restores(served, tmp_path, single_thread):
    import torch

    from tta.engine import FolderStateStore, StreamPool
    from tta.serve import replica_of

    config, handle, template = served
    # three streams on two replicas holding one state each: at least one replica evicts and restores
    ids = ["cam-a", "cam-b"]
    ids.append(next(f"cam-{i}" for i in range(100) if replica_of(f"cam-{i}", 2) == replica_of("cam-a", 2)
                    and f"cam-{i}" not in ids))
    data = {sid: batches(i, 4) for i, sid in enumerate(ids[:2])}
    handle_data = batches(7, 4)
    load = run_load("127.0.0.1", config.port, data, max_requests=100, max_seconds=300)
    assert load.stopped_by == "done" and load.requests == 8 and not any(load.errors.values())
    handle_classes = []
    for x in handle_data:  # the third stream through the Python handle, interleaved with HTTP below
        out = handle.predict.remote(ids[2], x).result()
        handle_classes += [p["class"] for p in out["predictions"]]
        status, _ = post(f"http://127.0.0.1:{config.port}/predict?stream={ids[0]}", encode_npy(x), "application/x-npy")
        assert status == 200
    pool = StreamPool(template.fork(), device="cpu", store=FolderStateStore(tmp_path / "ref"))
    for sid, xs in data.items():
        want = [c for x in xs for c in pool.step(sid, torch.from_numpy(x)).argmax(1).tolist()]
        assert load.classes(sid) == want, sid
    want = [c for x in handle_data for c in pool.step(ids[2], torch.from_numpy(x)).argmax(1).tolist()]
    assert handle_classes == want
    stats = handle.stats.remote().result()
    assert sum(r["evictions"] for r in stats) >= 2 and sum(r["restores"] for r in stats) >= 2
    assert handle.stream_stats.remote(ids[0]).result()["steps"] == 8


def test_bounded_request_loop_stops_by_itself(served):
    config, _, _ = served
    data = {f"loop-{i}": batches(20 + i, 50, size=4) for i in range(3)}
    load = run_load("127.0.0.1", config.port, data, max_requests=7, max_seconds=300)
    assert load.stopped_by == "max_requests" and load.requests == 7
    t0 = time.monotonic()
    load = run_load("127.0.0.1", config.port, data, max_requests=10_000, max_seconds=3)
    assert load.stopped_by == "max_seconds" and time.monotonic() - t0 < 3 + 120  # the last answers come back
    assert 0 < load.requests < 150


def test_bad_input_gets_clear_http_errors_and_touches_no_stream(served):
    config, handle, _ = served
    url = f"http://127.0.0.1:{config.port}"
    x = batches(3, 1)[0]
    assert post(f"{url}/predict?stream=guarded", encode_npy(x), "application/x-npy")[0] == 200
    before = handle.stream_stats.remote("guarded").result()
    cases = [
        (f"{url}/predict", encode_npy(x), "application/x-npy", 400, "no stream id"),
        (f"{url}/predict?stream=guarded", b"\x89PNG\r\n\x1a\ngarbage", "image/png", 400, "could not be decoded"),
        (f"{url}/predict?stream=guarded", encode_npy(np.zeros((2, 3, 28, 28), np.float32)), "application/x-npy", 400,
         "do not fit"),
        (f"{url}/predict?stream=guarded", encode_npy(np.zeros((600, 3, 32, 32), np.uint8)), "application/x-npy", 413,
         "exceed"),
        (f"{url}/predict?stream=guarded", b"hi", "text/plain", 415, "Content-Type"),
        (f"{url}/nowhere", b"", "application/x-npy", 404, "no route"),
    ]
    for target, body, ctype, status, words in cases:
        got, doc = post(target, body, ctype)
        assert got == status and words in doc["error"], (target, ctype, got, doc)
    # a body declared larger than the limit is refused before it is read
    conn = http.client.HTTPConnection("127.0.0.1", config.port, timeout=60)
    conn.putrequest("POST", "/predict?stream=guarded")
    conn.putheader("Content-Type", "application/x-npy")
    conn.putheader("Content-Length", str(config.max_request_bytes + 1))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and "exceeds the limit" in json.loads(response.read())["error"]
    conn.close()
    with pytest.raises(Exception, match="do not fit"):
        handle.predict.remote("guarded", np.zeros((2, 3, 8, 8), np.float32)).result()
    assert handle.stream_stats.remote("guarded").result() == before


def test_health_stream_stats_reset_and_ray_metrics(served):
    config, handle, _ = served
    url = f"http://127.0.0.1:{config.port}"
    status, health = get(f"{url}/health")
    assert status == 200 and len(health["replicas"]) == 2 and all(r["status"] == "ok" for r in health["replicas"])
    x = batches(5, 1)[0]
    for _ in range(3):
        post(f"{url}/predict?stream=metered", encode_npy(x), "application/x-npy")
    status, stats = get(f"{url}/streams/metered")
    assert status == 200 and stats["batches"] == 3 and stats["steps"] == 3 and stats["mean_entropy"] > 0
    assert stats["checkpoints"] == 1 and stats["checkpoint_step"] == 2
    status, out = post(f"{url}/reset?stream=metered", b"", "application/json")
    assert status == 200 and out["resets"] == 1
    assert get(f"{url}/streams/never-seen")[0] == 404
    deadline = time.monotonic() + 60  # Ray exports metrics every few seconds
    text = ""
    while time.monotonic() < deadline:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{config.metrics_port}/metrics", timeout=10).read().decode()
        except OSError:
            text = ""
        if 'tta_stream_batches_total' in text and 'stream="metered"' in text and "tta_stream_entropy" in text:
            break
        time.sleep(2)
    lines = [ln for ln in text.splitlines()
             if ln.startswith("ray_tta_stream_batches_total") and 'stream="metered"' in ln]
    assert lines and float(lines[0].rsplit(" ", 1)[1]) == 3.0


def test_killed_replica_restarts_from_the_store_losing_at_most_k_steps(served):
    config, handle, template = served
    import torch

    sid = "fault"
    xs = batches(11, 8)
    conn = http.client.HTTPConnection("127.0.0.1", config.port, timeout=600)
    for x in xs[:5]:
        status, doc = post_npy(conn, sid, x)
        assert status == 200
    assert doc["step"] == 5  # checkpoints at steps 2 and 4 (K = 2)
    name = handle.replica_actor_name.remote(sid).result()
    ray.kill(ray.get_actor(name, namespace="serve"))
    after = []
    deadline = time.monotonic() + 600  # the restart loads the model again: seconds, minutes on a loaded box
    i = 5
    while i < 8 and time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", config.port, timeout=600)
        try:
            status, doc = post_npy(conn, sid, xs[i])
        except (OSError, http.client.HTTPException):
            status = 599
        finally:
            conn.close()
        if status == 200:
            after.append(doc)
            i += 1
        else:
            time.sleep(0.5)
    assert [d["step"] for d in after] == [5, 6, 7]  # resumed from step 4: one step (the 5th) lost
    assert handle.stream_stats.remote(sid).result()["restored_step"] == 4
    reference = template.fork()
    for x in xs[:4]:
        reference(torch.from_numpy(x))
    for doc, x in zip(after, xs[5:]):
        assert [p["class"] for p in doc["predictions"]] == reference(torch.from_numpy(x)).argmax(1).tolist()
