"""`tta run --video FILE` / `--camera N`: an adapter over video frames through the frame batcher.

Frames are read with OpenCV, converted to the card's colour layout (RGB, or grey for a 1-channel card)
and resized to the card's input size (`--no-resize`: a frame of another size is an error), grouped
into micro-batches by `tta.engine.FrameBatcher` (`--batch-size`, default 16, flushed after
`--max-wait-ms`), predicted and adapted on. With --out: predictions.csv (frame, class, latency),
results.json/csv (throughput, latency), meta.json and run.log.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import time
from collections import deque
from pathlib import Path
from typing import Any

from tta.errors import ConfigError

DEFAULT_FRAME_BATCH = 16


def check_video_arguments(args: argparse.Namespace) -> None:
    from tta.cli.run import check_sizes

    if args.stream is not None:
        raise ConfigError("--video/--camera replace --stream: give one source")
    if args.limit is not None or args.full:
        raise ConfigError("--limit/--full apply to streams; use --max-frames N for video")
    if args.max_frames is not None and args.max_frames < 1:
        raise ConfigError(f"--max-frames must be >= 1, got {args.max_frames}")
    if not (math.isfinite(args.max_wait_ms) and 0 <= args.max_wait_ms <= 60_000):
        raise ConfigError(f"--max-wait-ms must be in 0..60000, got {args.max_wait_ms}")
    if args.camera is not None and args.camera < 0:
        raise ConfigError(f"--camera must be a camera index >= 0, got {args.camera}")
    check_sizes(args)


def source_name(args: argparse.Namespace) -> str:
    return f"camera {args.camera}" if args.camera is not None else f"video {args.video}"


def open_frames(args: argparse.Namespace, card: Any) -> Any:
    """The frames of --video/--camera for `card`, after decoding one frame (a bad source fails here)."""
    from tta.streams.datasets import VideoFrames

    size = tuple(card.input_size[1:])
    frames = VideoFrames(args.camera if args.camera is not None else args.video, size=size if args.resize else None,
                         channels=card.in_chans, max_frames=args.max_frames)
    h, w, _ = frames.probe()
    if not args.resize and (h, w) != size:
        raise ConfigError(f"{source_name(args)} has {h}x{w} frames but card {card.name} takes {size[0]}x{size[1]}; "
                          "drop --no-resize to resize them")
    return frames


def run_frames(args: argparse.Namespace, adapter: Any, card: Any, frames: Any, out: Path | None,
               meta: dict[str, Any], logger: logging.Logger) -> int:
    """Predict-and-adapt on every frame; log throughput; write predictions and results to `out`."""
    from tta.engine import FrameBatcher
    from tta.engine.metrics import RunResult, percentile
    from tta.engine.report import write_results

    batch = args.batch_size or DEFAULT_FRAME_BATCH
    logger.info(f"tta run: {adapter.name} on {card.name}, {source_name(args)}, frames as {tuple(card.input_size)} "
                f"(C, H, W), micro-batches of {batch}")
    counters = getattr(adapter, "counters", {})
    before = dict(counters)
    rows: list[tuple[int, int, float]] = []
    pending: deque[tuple[int, float, Any]] = deque()

    def collect(keep: int) -> None:
        """Take the finished predictions in order; block only while more than `keep` frames wait."""
        while pending and (len(pending) > keep or pending[0][2].done()):
            index, submitted, future = pending.popleft()
            prediction = future.result()  # a rejected frame raises its error here
            rows.append((index, int(prediction), (time.perf_counter() - submitted) * 1e3))

    start = time.perf_counter()
    with FrameBatcher(adapter, batch_size=batch, max_wait_ms=args.max_wait_ms, device=args.device, amp=args.amp,
                      input_size=tuple(card.input_size)) as batcher:
        for index, frame in enumerate(frames):
            pending.append((index, time.perf_counter(), batcher.submit(frame)))
            collect(4 * batch)  # keep decoding while the batcher works; bound the frames in flight
        batcher.flush()
        collect(0)
        sizes = list(batcher.batch_sizes)
    seconds = time.perf_counter() - start

    def delta(key: str) -> int:
        return int(counters.get(key, 0)) - int(before.get(key, 0))

    latencies = [r[2] for r in rows]
    result = RunResult(
        adapter=adapter.name, domains=[], domain_errors={}, domain_images={}, mean_error=None, images=len(rows),
        seconds=seconds, images_per_s=len(rows) / seconds if seconds > 0 else float("nan"),
        latency_ms_p50=percentile(latencies, 50), latency_ms_p95=percentile(latencies, 95), batches=len(sizes),
        steps=delta("steps"), small_batches=delta("small_batches"), device=str(getattr(batcher, "device", "cpu")),
    )
    logger.info(f"{result.images} frames, {result.images_per_s:.1f} frames/s, latency per frame p50 "
                f"{result.latency_ms_p50:.1f} ms p95 {result.latency_ms_p95:.1f} ms, {result.batches} micro-batches, "
                f"{result.steps} adaptation steps on {result.device}")
    if out is not None:
        predictions = out / "predictions.csv"
        with predictions.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["frame", "class", "latency_ms"])
            writer.writerows((i, c, f"{ms:.3f}") for i, c, ms in rows)
        written = write_results({adapter.name: result}, out, title=f"{source_name(args)} / {card.name}",
                                meta={**meta, "source": source_name(args), "frames": result.images,
                                      "micro_batch_sizes": sizes})
        logger.info("wrote " + ", ".join(str(p) for p in [predictions, *written.values()]))
    return 0
