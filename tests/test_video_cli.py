"""`tta run --video`: a generated clip through the frame batcher; the frame batcher's colour/size rule.

The clip is written with OpenCV (MJPG in AVI, decodable by every OpenCV build). `FrameBatcher` with
raw OpenCV frames (`channel_order="bgr"`, resized by the caller) predicts exactly what the
`VideoFrames` path predicts, and a frame whose size does not fit the card is rejected.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tta
from tta.cli import main
from tta.engine import FrameBatcher
from tta.errors import InvalidInputError
from tta.streams import VideoFrames

cv2 = pytest.importorskip("cv2")


def write_clip(path: Path, n: int, height: int, width: int, seed: int = 0) -> Path:
    """A clip of Fashion-MNIST-like blobs moving over a coloured background (BGR frames)."""
    rng = np.random.default_rng(seed)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (width, height))
    assert writer.isOpened()
    for i in range(n):
        frame = np.zeros((height, width, 3), np.uint8)
        frame[:] = (40 + 5 * i % 200, 80, 160)
        cv2.circle(frame, (width // 2 + (i % 7) - 3, height // 2), max(2, height // 4), (255, 255, 255), -1)
        frame = np.clip(frame.astype(int) + rng.integers(-20, 20, frame.shape), 0, 255).astype(np.uint8)
        writer.write(frame)
    writer.release()
    return path


def test_video_run_writes_predictions_and_throughput(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    clip = write_clip(tmp_path / "clip.avi", 37, 48, 64)
    out = tmp_path / "run"
    assert main(["run", "--adapter", "source", "--video", str(clip), "--batch-size", "8", "--no-progress",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "37 frames" in printed and "frames/s" in printed
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert [int(r["frame"]) for r in rows] == list(range(37)) and all(0 <= int(r["class"]) < 10 for r in rows)
    results = json.loads((out / "results.json").read_text())["source"]
    assert results["images"] == 37 and results["images_per_s"] > 0
    meta = json.loads((out / "meta.json").read_text())
    assert max(meta["micro_batch_sizes"]) == 8 and sum(meta["micro_batch_sizes"]) == 37
    assert meta["version"] == tta.__version__ and "37 frames" in (out / "run.log").read_text()

    # the same predictions as the VideoFrames path (RGB, resized to the card's 32x32) without a batcher
    frames = torch.stack(list(VideoFrames(clip, size=(32, 32))))
    with torch.no_grad():
        expected = tta.models.load("resnet20-fmnist")(frames).argmax(1).tolist()
    assert [int(r["class"]) for r in rows] == expected
    # an adapting run through the batcher (batch statistics need the micro-batches)
    assert main(["run", "--adapter", "bn", "--video", str(clip), "--no-progress", "--max-frames", "20"]) == 0
    assert "20 frames" in capsys.readouterr().out


def test_video_of_the_wrong_size_is_rejected_with_no_resize(tmp_path, capsys):
    clip = write_clip(tmp_path / "big.avi", 5, 48, 64)
    assert main(["run", "--adapter", "bn", "--video", str(clip), "--no-resize", "--no-progress",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "has 48x64 frames but card resnet20-fmnist takes 32x32" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()
    small = write_clip(tmp_path / "small.avi", 5, 32, 32)
    assert main(["run", "--adapter", "source", "--video", str(small), "--no-resize", "--no-progress"]) == 0


def test_frame_batcher_agrees_with_video_frames_and_rejects_wrong_sizes(tmp_path):
    clip = write_clip(tmp_path / "clip.avi", 12, 48, 64, seed=3)
    model = tta.models.load("resnet20-fmnist")
    reference = torch.stack(list(VideoFrames(clip, size=(32, 32))))
    with torch.no_grad():
        expected = model(reference).argmax(1).tolist()

    cap = cv2.VideoCapture(str(clip))
    raw = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        raw.append(frame)
    cap.release()
    resized = [cv2.resize(f, (32, 32), interpolation=cv2.INTER_AREA) for f in raw]
    with FrameBatcher(tta.adapt(model, "source"), batch_size=4, max_wait_ms=5, device="cpu",
                      input_size=(3, 32, 32), channel_order="bgr") as fb:
        assert list(fb.map(resized)) == expected
        with pytest.raises(InvalidInputError, match=r"frame of shape \(3, 48, 64\).*takes \(3, 32, 32\)"):
            fb.submit(raw[0]).result()  # a 64x48 frame for a 32x32 model
        with pytest.raises(InvalidInputError, match="takes 3 channel"):
            fb.submit(np.zeros((32, 32, 1), np.uint8)).result()
    # without the colour flag, raw BGR frames are read as RGB and predict something else
    with FrameBatcher(tta.adapt(model, "source"), batch_size=4, device="cpu", input_size=(3, 32, 32)) as fb:
        rgb = [f[:, :, ::-1].copy() for f in resized]
        assert list(fb.map(rgb)) == expected


def test_grey_card_gets_grey_frames(tmp_path):
    clip = write_clip(tmp_path / "clip.avi", 3, 32, 32)
    frames = list(VideoFrames(clip, channels=1))
    assert frames[0].shape == (1, 32, 32) and frames[0].dtype == torch.float32
