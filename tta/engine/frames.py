"""`FrameBatcher`: single frames in (from any thread), micro-batched predict-and-adapt, predictions out.

Cameras and video decoders deliver one image at a time, but batch-statistics adapters need batches.
The batcher queues frames and flushes a micro-batch when `batch_size` frames wait or when the oldest
waiting frame has waited `max_wait_ms` (bounded latency at low frame rates). One worker thread owns
the adapter, so batches are adapted on in submission order and each frame's future resolves in
that order. A micro-batch of one goes through the adapter's small-batch policy
(`AdapterConfig.small_batch`: predict with source statistics without adapting, or raise).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from tta.engine.runner import autocast, predicted_classes, resolve_amp, resolve_device
from tta.errors import InvalidInputError, NonFiniteInputError

#: longest single wait of the worker (threading.TIMEOUT_MAX is ~292 years on Linux; one hour is plenty)
_MAX_WAIT_S = min(3600.0, threading.TIMEOUT_MAX)


@dataclass
class _Pending:
    frame: torch.Tensor
    future: Future
    submitted: float


class FrameBatcher:
    """Group single frames into micro-batches for an adapter; resolve one future per frame.

    adapter: the adapted model (its `forward` predicts and adapts).
    batch_size: frames per micro-batch (flush as soon as this many wait).
    max_wait_ms: flush a partial batch once its oldest frame has waited this long; ``math.inf``
        never flushes on time (only full batches, `flush()` and `close()`); any finite value above
        `threading.TIMEOUT_MAX` waits in chunks of at most that.
    device: where the adapter runs (``"auto"``: CUDA when available).
    return_scores: futures resolve to the frame's output row (logits or probabilities) instead of
        its predicted class index.
    input_size: (C, H, W) the model takes (a model card's ``input_size``); a frame of another shape
        is rejected. None accepts any size (frames of different sizes are then never batched together).
    channel_order: colour order of numpy frames: ``"rgb"`` (default; what `tta.streams.VideoFrames`
        yields) or ``"bgr"`` (OpenCV's ``cv2.VideoCapture.read()``), converted to RGB here. Tensor
        frames are always RGB.

    Frames are (C, H, W) float tensors in the model's input range, or (H, W, C) uint8 numpy arrays
    (scaled to [0, 1]). Resize frames to the model's input size before submitting them (VideoFrames
    does: ``VideoFrames(src, size=card.input_size[1:], channels=card.in_chans)``). A malformed frame
    (wrong rank, channels or size, NaN/Inf) fails its own future at `submit` and never reaches the
    adapter; an adapter error fails the futures of its micro-batch.

        with FrameBatcher(adapter, batch_size=16, max_wait_ms=20) as fb:
            for label in fb.map(frames):
                ...
    """

    def __init__(
        self,
        adapter: nn.Module,
        batch_size: int = 16,
        max_wait_ms: float = 20.0,
        *,
        device: str | torch.device = "auto",
        amp: bool | str = False,
        return_scores: bool = False,
        input_size: tuple[int, int, int] | None = None,
        channel_order: str = "rgb",
    ) -> None:
        if channel_order not in ("rgb", "bgr"):
            raise InvalidInputError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}")
        if input_size is not None and (len(input_size) != 3 or any(int(v) < 1 for v in input_size)):
            raise InvalidInputError(f"input_size must be (C, H, W) of positive sizes, got {input_size!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidInputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, (int, float)) or not max_wait_ms >= 0:
            raise InvalidInputError(f"max_wait_ms must be a number >= 0 (math.inf: no time limit), got {max_wait_ms!r}")
        self.adapter = adapter
        self.batch_size = int(batch_size)
        self.max_wait_s = float(max_wait_ms) / 1e3
        self.device = resolve_device(device)
        self._amp = resolve_amp(amp, self.device)
        self.return_scores = return_scores
        self.input_size = None if input_size is None else tuple(int(v) for v in input_size)
        self.channel_order = channel_order
        self.in_channels = self.input_size[0] if self.input_size is not None else getattr(adapter, "in_channels", None)
        self.adapter.to(self.device)
        self.batch_sizes: list[int] = []  # size of every micro-batch run (for monitoring and tests)
        self._pending: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._flush = False
        self._failure: BaseException | None = None  # set when the worker thread itself died
        self._worker = threading.Thread(target=self._work, name="tta-frames", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ producer side
    def submit(self, frame: Any) -> Future:
        """Queue one frame; the future resolves to its predicted class (or output row)."""
        future: Future = Future()
        try:
            tensor = self._as_tensor(frame)
        except InvalidInputError as exc:
            future.set_exception(exc)
            return future
        with self._cond:
            if self._failure is not None:
                raise RuntimeError(f"FrameBatcher's worker failed ({self._failure!r}); frames can no longer be "
                                   "submitted") from self._failure
            if self._closed:
                raise RuntimeError("FrameBatcher is closed; frames can no longer be submitted")
            self._pending.append(_Pending(tensor, future, time.monotonic()))
            self._cond.notify()
        return future

    def map(self, frames: Iterable[Any]) -> Iterator[Any]:
        """Submit `frames` and yield their predictions in order (frames are submitted ahead).

        A failed frame raises its error here and ends the iteration; use `submit` to handle
        errors frame by frame.
        """
        window: deque[Future] = deque()
        for frame in frames:
            window.append(self.submit(frame))
            if len(window) >= self.batch_size:
                yield window.popleft().result()
        self.flush()  # no more frames are coming: don't wait max_wait_ms for the tail
        while window:
            yield window.popleft().result()

    def flush(self) -> None:
        """Run the frames waiting now without waiting for a full batch or `max_wait_ms`."""
        with self._cond:
            self._flush = True
            self._cond.notify()

    def close(self) -> None:
        """Process the frames already submitted, then stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._worker.join()

    def __enter__(self) -> "FrameBatcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ worker side
    def _next_batch(self) -> list[_Pending] | None:
        """Block until a micro-batch is due; None when closed and drained."""
        with self._cond:
            while True:
                if self._pending:
                    due = self._pending[0].submitted + self.max_wait_s  # inf when max_wait_ms is inf
                    if (len(self._pending) >= self.batch_size or self._closed or self._flush
                            or time.monotonic() >= due):
                        return self._take()
                    # Condition.wait rejects timeouts above threading.TIMEOUT_MAX (OverflowError): wait in
                    # chunks; a new frame, flush() or close() wakes the worker earlier anyway
                    self._cond.wait(timeout=min(max(0.0, due - time.monotonic()), _MAX_WAIT_S))
                elif self._closed:
                    return None
                else:
                    self._flush = False
                    self._cond.wait()

    def _take(self) -> list[_Pending]:
        shape = self._pending[0].frame.shape
        batch: list[_Pending] = []
        while self._pending and len(batch) < self.batch_size and self._pending[0].frame.shape == shape:
            batch.append(self._pending.popleft())
        return batch

    def _work(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # noqa: BLE001 - a bug here must not leave futures hanging
            with self._cond:
                self._failure = exc
                pending, self._pending = list(self._pending), deque()
            for p in pending:
                if p.future.set_running_or_notify_cancel():
                    p.future.set_exception(exc)

    def _serve(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = [p for p in batch if p.future.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                x = torch.stack([p.frame for p in live]).to(self.device)
                with autocast(self.device, self._amp):
                    outputs = self.adapter(x)
                outputs = outputs.detach().float().cpu()
                results = list(outputs) if self.return_scores else predicted_classes(outputs).tolist()
            except BaseException as exc:  # noqa: BLE001 - delivered to the affected futures
                for p in live:
                    p.future.set_exception(exc)
                continue
            self.batch_sizes.append(len(live))
            for p, r in zip(live, results):
                p.future.set_result(r)

    # ------------------------------------------------------------------ input checks
    def _as_tensor(self, frame: Any) -> torch.Tensor:
        if isinstance(frame, np.ndarray):
            if frame.ndim != 3 or frame.dtype != np.uint8:
                raise InvalidInputError(
                    f"a numpy frame must be an (H, W, C) uint8 image, got shape {frame.shape} dtype {frame.dtype}"
                )
            if self.channel_order == "bgr" and frame.shape[2] == 3:
                frame = frame[:, :, ::-1]
            tensor = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).float().div_(255.0)
        elif isinstance(frame, torch.Tensor):
            if frame.dim() != 3:
                raise InvalidInputError(f"a tensor frame must have shape (C, H, W), got {tuple(frame.shape)}")
            if not frame.is_floating_point():
                raise InvalidInputError(
                    f"a tensor frame must be floating point, got {frame.dtype} (convert uint8 with x.float() / 255)"
                )
            tensor = frame.detach().to("cpu", torch.float32, copy=True)  # the caller may reuse its buffer
        else:
            raise InvalidInputError(f"expected a (C, H, W) tensor or (H, W, C) uint8 array, got {type(frame).__name__}")
        if self.in_channels is not None and tensor.shape[0] != self.in_channels:
            raise InvalidInputError(
                f"the model takes {self.in_channels} channel(s); got a frame with {tensor.shape[0]} "
                f"(shape {tuple(tensor.shape)} as C, H, W)"
            )
        if self.input_size is not None and tuple(tensor.shape) != self.input_size:
            raise InvalidInputError(
                f"frame of shape {tuple(tensor.shape)} (C, H, W) does not fit the model, which takes {self.input_size}; "
                f"resize frames to {self.input_size[1]}x{self.input_size[2]} first (VideoFrames(size=...) does)"
            )
        if not bool(torch.isfinite(tensor).all()):
            raise NonFiniteInputError("frame contains NaN/Inf values; it was not batched or adapted on")
        return tensor
