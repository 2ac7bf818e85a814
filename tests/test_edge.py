"""Edge runtime: torch-free import, providers, AdaNPC memory, state files, video loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tta.edge import (
    EdgeAdaNPC, EdgeAlphaBN, EdgeModel, ProviderError, ProviderFallbackWarning, knn_vote, run_video, select_providers,
)
from tta.edge import providers as providers_mod
from tta.errors import BatchTooSmallError, ConfigError, StateMismatchError

from test_export import tiny_exports  # noqa: E402  (tests/ is on sys.path under pytest's default import mode)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny_exports(tmp_path_factory.getbasetemp() / "tta_exports")


def _memory(model: EdgeModel, n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.random((n, 3, 32, 32), dtype=np.float32)
    return EdgeAdaNPC.source_memory(model, images, rng.integers(0, 10, n), batch_size=32)


# ---------------------------------------------------------------------------------------- no torch
def test_edge_runs_end_to_end_without_torch(exports, tmp_path):
    """`import tta.edge` and a full predict/adapt/save/load/video run with torch unimportable."""
    import cv2

    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (48, 40))
    for i in range(9):
        writer.write(np.full((40, 48, 3), 20 * i, np.uint8))
    writer.release()
    script = textwrap.dedent(f"""
        import json, sys
        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, NoTorch())
        import numpy as np
        from tta import edge
        rng = np.random.default_rng(0)
        x = rng.random((6, 3, 32, 32), dtype=np.float32)
        abn = edge.load_adapter({str(exports['alpha-bn'])!r}, providers="cpu")
        logits = abn(x)
        feats = edge.EdgeModel({str(exports['features'])!r}, providers="cpu")
        src_f, src_y = edge.EdgeAdaNPC.source_memory(feats, rng.random((40, 3, 32, 32), dtype=np.float32),
                                                     rng.integers(0, 10, 40))
        npc = edge.EdgeAdaNPC(feats, src_f, src_y, k=5, beta=0.0, capacity=50)
        probs = [npc(x) for _ in range(3)]
        npc.save({str(tmp_path / 'mem.safetensors')!r})
        again = edge.EdgeAdaNPC(feats, src_f, src_y, k=5, beta=0.0, capacity=50)
        again.load({str(tmp_path / 'mem.safetensors')!r})
        same = bool(np.array_equal(again(x), npc(x)))
        frames = [r.frames.tolist() for r in edge.run_video(abn, {str(video)!r}, batch_size=4)]
        print(json.dumps({{"torch": sorted(m for m in sys.modules if m.split(".")[0] == "torch"),
                          "logits": list(logits.shape), "rows": len(npc), "same": same, "frames": frames,
                          "probs_sum": float(probs[-1].sum(1).mean())}}))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["torch"] == []
    assert result["logits"] == [6, 10] and result["rows"] == 50 and result["same"]
    assert result["frames"] == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    assert result["probs_sum"] == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------------------------------- kNN vote
def test_knn_vote_matches_torch_reference():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((7, 16)).astype(np.float32)
    keys = rng.standard_normal((40000, 16)).astype(np.float32)  # > one tile of 16384 rows
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    labels = rng.integers(0, 10, keys.shape[0])
    got = knn_vote(q, keys, labels, k=50, temperature=0.1, num_classes=10)
    sims = torch.from_numpy(q) @ torch.from_numpy(keys).T
    top, idx = sims.topk(50, dim=1)
    w = torch.softmax(top / 0.1, dim=1)
    want = torch.zeros(7, 10).scatter_add_(1, torch.from_numpy(labels)[idx], w).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    small = knn_vote(q, keys[:3], labels[:3], k=50, temperature=0.1, num_classes=10)  # k > M: every row votes
    assert np.allclose(small.sum(1), 1.0)


# ---------------------------------------------------------------------------------------- AdaNPC memory
def test_adanpc_appends_confident_and_evicts_fifo(exports):
    feats = EdgeModel(exports["features"], "cpu")
    src_f, src_y = _memory(feats, 30)
    npc = EdgeAdaNPC(feats, src_f, src_y, k=5, temperature=0.1, beta=0.0, capacity=45)
    rng = np.random.default_rng(3)
    batches = [rng.random((8, 3, 32, 32), dtype=np.float32) for _ in range(3)]
    expected_keys = []
    source_rows = npc.rows()[0].copy()
    for x in batches:
        probs = npc(x)
        expected_keys.append(feats.run(x))
        assert probs.shape == (8, 10) and np.allclose(probs.sum(1), 1.0, atol=1e-5)
        assert len(npc) <= 45
        np.testing.assert_array_equal(npc.rows()[0][:30], source_rows)  # source part pinned
    keys, _ = npc.rows()
    assert len(npc) == 45 and npc.counters["appended"] == 24 and npc.next_stamp == 24
    order = np.argsort(npc.stamps[30:45])
    assert npc.stamps[30:45][order].tolist() == list(range(9, 24))  # FIFO: the 15 newest survive
    newest = np.concatenate(expected_keys)[-15:]
    newest /= np.linalg.norm(newest, axis=1, keepdims=True)
    np.testing.assert_allclose(keys[30:][order], newest, atol=1e-6)
    npc.reset()
    assert len(npc) == 30


def test_adanpc_beta_gates_the_memory(exports):
    feats = EdgeModel(exports["features"], "cpu")
    src_f, src_y = _memory(feats, 20)
    npc = EdgeAdaNPC(feats, src_f, src_y, k=3, beta=1.0)
    x = np.random.default_rng(4).random((6, 3, 32, 32), dtype=np.float32)
    probs = npc(x)
    assert len(npc) == 20 + int((probs.max(1) >= 1.0).sum())


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_adanpc_state_round_trip(exports, tmp_path, suffix):
    feats = EdgeModel(exports["features"], "cpu")
    src_f, src_y = _memory(feats, 25)
    rng = np.random.default_rng(5)
    xs = [rng.random((6, 3, 32, 32), dtype=np.float32) for _ in range(5)]
    npc = EdgeAdaNPC(feats, src_f, src_y, k=4, beta=0.0, capacity=36, storage_dtype="float16")
    for x in xs[:3]:
        npc(x)
    path = npc.save(tmp_path / f"mem{suffix}")
    restored = EdgeAdaNPC(feats, src_f[:5], src_y[:5], k=99)  # different config: replaced by the file's
    restored.load(path)
    assert restored.config == npc.config and restored.counters == npc.counters
    for x in xs[3:]:  # same future: identical predictions and memory
        np.testing.assert_array_equal(restored(x), npc(x))
    for a, b in zip(restored.rows(), npc.rows()):
        np.testing.assert_array_equal(a, b)


def test_adanpc_bad_states_and_inputs(exports, tmp_path):
    feats = EdgeModel(exports["features"], "cpu")
    src_f, src_y = _memory(feats, 10)
    npc = EdgeAdaNPC(feats, src_f, src_y)
    path = npc.save(tmp_path / "mem.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(StateMismatchError, match="not a readable AdaNPC state"):
        npc.load(tmp_path / "cut.safetensors")
    from safetensors.numpy import save_file

    save_file({"features": np.zeros((3, 7), np.float32), "labels": np.zeros(3, np.int64),
               "stamps": np.full(3, -1, np.int64)}, str(tmp_path / "dim.safetensors"),
              metadata={"format": "tta.edge.adanpc/1", "adapter": "adanpc", "num_source": "3", "next_stamp": "0",
                        "num_classes": "10", "config": "{}"})
    with pytest.raises(StateMismatchError, match="does not fit"):
        npc.load(tmp_path / "dim.safetensors")
    with pytest.raises(ConfigError, match=".safetensors or .npz"):
        npc.save(tmp_path / "mem.pt")
    with pytest.raises(ConfigError, match="no room for test entries"):
        EdgeAdaNPC(feats, src_f, src_y, capacity=10)
    with pytest.raises(ValueError, match="labels"):
        EdgeAdaNPC(feats, src_f, src_y + 10)
    before = npc.rows()[0].copy()
    bad = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)
    bad[0, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN/Inf"):
        npc(bad)
    np.testing.assert_array_equal(npc.rows()[0], before)  # nothing appended


def test_alpha_bn_small_batch_policy(exports):
    x = np.random.default_rng(0).random((1, 3, 32, 32), dtype=np.float32)
    with pytest.raises(BatchTooSmallError):
        EdgeAlphaBN(exports["alpha-bn"], "cpu", small_batch="raise")(x)
    edge = EdgeAlphaBN(exports["alpha-bn"], "cpu")
    edge(x)
    assert edge.counters == {"batches": 1, "small_batches": 1}


# ---------------------------------------------------------------------------------------- providers
def test_provider_selection_and_fallback(monkeypatch):
    everything = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert select_providers("auto", everything) == everything
    assert select_providers("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"])[0] == "CUDAExecutionProvider"
    assert select_providers("auto", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.warns(ProviderFallbackWarning, match="onnxruntime-gpu"):
        assert select_providers("cuda", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(ProviderError, match="tensorrt"):
        select_providers("tensorrt", ["CPUExecutionProvider"], strict=True)
    with pytest.raises(ProviderError, match="unknown execution provider"):
        select_providers("tpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_providers(["cuda", "cpu"], everything) == everything[1:]


def test_tensorrt_provider_gets_engine_cache_and_fp16_options():
    got = providers_mod.with_options(["TensorrtExecutionProvider", "CPUExecutionProvider"], fp16=True,
                                     trt_cache_dir="/tmp/cache")
    assert got == [("TensorrtExecutionProvider", {"trt_fp16_enable": "True", "trt_engine_cache_enable": "True",
                                                  "trt_engine_cache_path": "/tmp/cache"}), "CPUExecutionProvider"]


def test_gpu_libraries_are_preloaded_once_for_a_gpu_provider_only(monkeypatch):
    calls = []
    monkeypatch.setattr(providers_mod, "_PRELOADED", False)
    monkeypatch.setattr(providers_mod.ort, "preload_dlls", lambda: calls.append(1), raising=False)
    providers_mod.preload_gpu_libraries(["CPUExecutionProvider"])
    assert calls == []
    providers_mod.preload_gpu_libraries(["CUDAExecutionProvider", "CPUExecutionProvider"])
    providers_mod.preload_gpu_libraries(["TensorrtExecutionProvider", "CPUExecutionProvider"])
    assert calls == [1]  # once per process

    def broken():
        raise OSError("libcudnn.so.9: cannot open shared object file")

    monkeypatch.setattr(providers_mod, "_PRELOADED", False)
    monkeypatch.setattr(providers_mod.ort, "preload_dlls", broken, raising=False)
    with pytest.warns(ProviderFallbackWarning, match="libcudnn"):
        providers_mod.preload_gpu_libraries(["CUDAExecutionProvider"])


def test_a_gpu_provider_that_does_not_start_warns_or_raises_when_strict(exports, monkeypatch):
    """The build lists CUDA but the session starts on the CPU (e.g. cuDNN missing): a warning, or
    `ProviderError` with strict_providers, never a silent CPU run."""
    import tta.edge.model as model_mod

    monkeypatch.setattr(model_mod, "select_providers", lambda *a, **k: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(model_mod, "preload_gpu_libraries", lambda providers: None)
    monkeypatch.setattr(model_mod, "with_options", lambda providers, fp16, cache: ["CPUExecutionProvider"])
    with pytest.warns(ProviderFallbackWarning, match="could not start"):
        assert EdgeModel(exports["frozen"], "cuda").providers == ["CPUExecutionProvider"]
    with pytest.raises(ProviderError, match="could not start"):
        EdgeModel(exports["frozen"], "cuda", strict_providers=True)


def test_both_onnxruntime_packages_installed_is_an_error(monkeypatch):
    monkeypatch.setattr(providers_mod.metadata, "version", lambda name: "1.0")
    with pytest.raises(ProviderError, match="pip uninstall -y onnxruntime onnxruntime-gpu"):
        providers_mod.check_onnxruntime_install()


# ---------------------------------------------------------------------------------------- video
def test_video_loop_batches_frames_like_the_model_input(exports, tmp_path):
    import cv2

    path = tmp_path / "clip.avi"
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (24, 40, 3), dtype=np.uint8) for _ in range(7)]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5, (40, 24))
    for f in frames:
        writer.write(f)
    writer.release()
    edge = EdgeAlphaBN(exports["alpha-bn"], "cpu")
    results = list(run_video(edge, path, batch_size=3))
    assert [r.frames.tolist() for r in results] == [[0, 1, 2], [3, 4, 5], [6]]
    assert edge.counters == {"batches": 3, "small_batches": 1}
    capture = cv2.VideoCapture(str(path))
    decoded = [capture.read()[1] for _ in range(3)]
    from tta.edge import frames_to_batch

    batch = frames_to_batch(decoded, (3, 32, 32))
    assert batch.shape == (3, 3, 32, 32) and batch.dtype == np.float32 and 0 <= batch.min() and batch.max() <= 1
    np.testing.assert_allclose(results[0].outputs, EdgeAlphaBN(exports["alpha-bn"], "cpu")(batch), atol=1e-6)
    with pytest.raises(Exception, match="does not exist"):
        list(run_video(edge, tmp_path / "missing.mp4"))


# ---------------------------------------------------------------------------------------- vs PyTorch AdaNPC
def _torch_adanpc(src_f: np.ndarray, src_y: np.ndarray, **config):
    import tta
    from test_export import tiny_cnn

    adapter = tta.adapt(tiny_cnn(), "adanpc", **config)
    adapter.set_source_memory(torch.from_numpy(src_f), torch.from_numpy(src_y), 10)
    return adapter


@pytest.mark.parametrize("capacity", [None, 40])
def test_edge_adanpc_matches_pytorch_adapter_and_state_moves_both_ways(exports, tmp_path, capacity):
    from tta.export import adanpc_state_to_edge, load_edge_state_into

    feats = EdgeModel(exports["features"], "cpu")
    src_f, src_y = _memory(feats, 24)
    config = dict(k=7, temperature=0.1, beta=0.3, capacity=capacity)
    edge = EdgeAdaNPC(feats, src_f, src_y, **config)
    torch_npc = _torch_adanpc(src_f, src_y, **config)
    rng = np.random.default_rng(7)
    xs = [rng.random((8, 3, 32, 32), dtype=np.float32) for _ in range(6)]
    for x in xs[:3]:
        got = edge(x)
        with torch.no_grad():
            want = torch_npc(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert len(edge) == torch_npc.memory.size
    np.testing.assert_array_equal(edge.rows()[1], torch_npc.memory.rows()[1].numpy())  # same rows, same order
    # torch -> edge: a fresh edge adapter continues from the torch memory
    path = adanpc_state_to_edge(torch_npc, tmp_path / "from_torch.safetensors", exports["features"])
    resumed = EdgeAdaNPC(feats, src_f, src_y, **config)
    resumed.load(path)
    # edge -> torch: a fresh torch adapter continues from the edge memory
    edge.save(tmp_path / "from_edge.safetensors")
    torch_resumed = _torch_adanpc(src_f, src_y, **config)
    load_edge_state_into(torch_resumed, tmp_path / "from_edge.safetensors")
    for x in xs[3:]:
        with torch.no_grad():
            want = torch_npc(torch.from_numpy(x)).numpy()
            want2 = torch_resumed(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(resumed(x), want, atol=1e-5)
        np.testing.assert_allclose(edge(x), want2, atol=1e-5)


def test_edge_reads_the_source_memory_files_of_tta_build_memory(tmp_path):
    from tta.adapters.adanpc import save_memory
    from tta.edge import load_source_memory

    feats, labels = torch.randn(12, 16), torch.randint(0, 10, (12,))
    save_memory(tmp_path / "card.memory.safetensors", feats, labels, 10)
    got_f, got_y, classes = load_source_memory(tmp_path / "card.memory.safetensors")
    np.testing.assert_allclose(got_f, torch.nn.functional.normalize(feats, dim=1).numpy(), atol=1e-6)
    assert got_y.tolist() == labels.tolist() and classes == 10
    (tmp_path / "bad.memory.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(FileNotFoundError, match="not a readable AdaNPC memory file"):
        load_source_memory(tmp_path / "bad.memory.safetensors")


def test_graph_checksum_is_verified_on_load(tmp_path):
    """A file whose graph changed after export (one weight byte) is refused; the intact one loads."""
    import onnx

    from tta.edge import EdgeModel, ModelFileError
    from tta.edge.integrity import graph_sha256
    from tta.export import export_onnx

    path = tmp_path / "m.onnx"
    export_onnx("resnet20-fmnist", path, mode="frozen", verify=False)
    meta = EdgeModel(path, "cpu").metadata
    assert meta.graph_sha256 == graph_sha256(path.read_bytes())
    proto = onnx.load(str(path))
    init = proto.graph.initializer[0]
    raw = bytearray(init.raw_data)
    raw[0] ^= 0x01
    init.raw_data = bytes(raw)
    tampered = tmp_path / "tampered.onnx"
    onnx.save(proto, str(tampered))
    with pytest.raises(ModelFileError, match="checksum mismatch.*modified or damaged after export"):
        EdgeModel(tampered, "cpu")
    # a file without the checksum (exported before it existed) loads with a warning
    del proto.metadata_props[[p.key for p in proto.metadata_props].index("tta.graph_sha256")]
    init.raw_data = bytes(raw)
    onnx.save(proto, str(tampered))
    with pytest.warns(UserWarning, match="no graph checksum"):
        EdgeModel(tampered, "cpu")
    with pytest.raises(ModelFileError, match="not a well-formed ONNX model"):
        graph_sha256(path.read_bytes()[:-7])
