"""Frame-stream loop: OpenCV video (file, camera index or stream URL) -> micro-batches -> adapter.

Frames are converted BGR -> RGB (or grey for 1-channel models), resized to the export's input size
and scaled to float [0, 1]; `batch_size` frames are grouped so batch-statistics adapters
(alpha-BN) see more than one image. The last, shorter batch is run as well (a single frame follows
the adapter's small-batch policy).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from tta.edge.adapters import EdgeAdapter
from tta.edge.errors import ModelFileError
from tta.errors import ConfigError


@dataclass
class FrameResult:
    """Predictions of one micro-batch: frame indices (N,), class ids (N,), raw outputs (N, C)."""

    frames: np.ndarray
    classes: np.ndarray
    outputs: np.ndarray


def frames_to_batch(frames: list[np.ndarray], chw: tuple[int, int, int]) -> np.ndarray:
    import cv2

    c, h, w = chw
    out = np.empty((len(frames), c, h, w), dtype=np.float32)
    for i, frame in enumerate(frames):  # per-frame resize is OpenCV's API; the rest is batched
        if frame.ndim == 2:
            frame = frame[:, :, None]
        if c == 1 and frame.shape[2] != 1:
            frame = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)[:, :, None]
        elif c == 3 and frame.shape[2] == 1:
            frame = np.repeat(frame, 3, axis=2)
        elif c == 3:
            frame = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        resized = cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA)
        out[i] = resized.reshape(h, w, c).transpose(2, 0, 1)
    return out / np.float32(255.0)


def run_video(adapter: EdgeAdapter, source: str | os.PathLike[str] | int | Any, batch_size: int = 16,
              max_frames: int | None = None) -> Iterator[FrameResult]:
    """Yield predictions for every `batch_size` frames of `source` (path, camera index or cv2.VideoCapture)."""
    import cv2

    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    own = not hasattr(source, "read")
    if own and not isinstance(source, int) and not os.path.exists(os.fspath(source)) and "://" not in str(source):
        raise ModelFileError(f"video {source} does not exist")
    capture = cv2.VideoCapture(source if isinstance(source, int) else os.fspath(source)) if own else source
    if not capture.isOpened():
        raise ModelFileError(f"OpenCV cannot open video source {source!r}")
    chw = tuple(adapter.metadata.input_shape[1:])
    frames: list[np.ndarray] = []
    index = 0
    try:
        while max_frames is None or index < max_frames:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(frame)
            index += 1
            if len(frames) == batch_size:
                yield _run(adapter, frames, chw, index)
                frames = []
        if frames:
            yield _run(adapter, frames, chw, index)
    finally:
        if own:
            capture.release()


def _run(adapter: EdgeAdapter, frames: list[np.ndarray], chw: tuple[int, int, int], end: int) -> FrameResult:
    outputs = adapter(frames_to_batch(frames, chw))
    return FrameResult(np.arange(end - len(frames), end), outputs.argmax(axis=1), outputs)
