"""Run metrics: per-domain error, throughput, per-batch latency, adaptation counters."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch


@dataclass
class RunResult:
    """What `run_stream` measured on one stream.

    domain_errors: error % per domain in stream order (empty for unlabeled streams); samples of
        skipped (non-finite) batches count as errors.
    mean_error: mean of the per-domain errors (the peers' "mean" column), None when unlabeled.
    images_per_s: images processed per second of wall time of the loop (data waits included).
    latency_ms_p50/p95: per-batch predict-and-adapt time (host-synchronised).
    steps: adaptation steps taken (`adapter.counters["steps"]` during the run).
    skipped_batches/skipped_images: batches rejected for their values (NaN/Inf, or outside the
        model's input range; not adapted on).
    small_batches: batches predicted without adapting by the small-batch policy.
    skipped_nonfinite_loss: steps whose loss was non-finite (not applied).
    nonfinite_param_resets: resets to the source state after an update left non-finite parameters.
    resets: resets made by the reset policy.
    nonfinite_outputs: batches whose outputs held NaN/Inf (a healthy run has 0).
    guard_events: what the collapse guard did (`tta.engine.guard`): batch, action, reason, signals;
        guard: its settings and counts (None without a guard); guard_seconds: time spent in it.
    heap_trims / heap_trim_seconds: heap trims made (`tta.engine.heap`) and the time they took.
    realtime: the real-time protocol's settings, costs and counts (`RealtimeSchedule.summary`:
        ``adapted_fraction`` of the batches), None without it.
    trace: images, correct predictions and elapsed seconds per batch (`windows()` groups them).
    predictions: predicted class per image (-1 for skipped batches) when kept, else None.
    """

    adapter: str
    domains: list[str]
    domain_errors: dict[str, float]
    domain_images: dict[str, int]
    mean_error: float | None
    images: int
    seconds: float
    images_per_s: float
    latency_ms_p50: float
    latency_ms_p95: float
    batches: int
    steps: int
    small_batches: int = 0
    skipped_batches: int = 0
    skipped_images: int = 0
    skipped_nonfinite_loss: int = 0
    nonfinite_param_resets: int = 0
    resets: int = 0
    nonfinite_outputs: int = 0
    device: str = "cpu"
    amp: str | None = None
    guard_events: list[dict[str, Any]] = field(default_factory=list)
    guard: dict[str, Any] | None = None
    guard_seconds: float = 0.0
    heap_trims: int = 0
    heap_trim_seconds: float = 0.0
    realtime: dict[str, Any] | None = None
    trace: "BatchTrace | None" = field(default=None, repr=False)
    predictions: torch.Tensor | None = field(default=None, repr=False)

    @property
    def accuracy(self) -> float | None:
        return None if self.mean_error is None else 100.0 - self.mean_error

    @property
    def stream_error(self) -> float | None:
        """Error % over every image of the stream (a window-size-free figure; `mean_error` averages domains)."""
        if self.trace is None or not self.trace.labeled:
            return None
        return 100.0 * (1.0 - sum(self.trace.correct) / sum(self.trace.images))

    def windows(self, size: int) -> list[dict[str, float]]:
        """Consecutive windows of `size` images (see `BatchTrace.windows`)."""
        if self.trace is None:
            return []
        return self.trace.windows(size)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (predictions left out; the trace as lists)."""
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name not in ("predictions", "trace")}
        out["trace"] = None if self.trace is None else self.trace.to_dict()
        return out


@dataclass
class BatchTrace:
    """Per batch: images, correct predictions (skipped batches: 0; unlabeled: -1), seconds since the
    start of the run at the end of the batch. Small: three numbers per batch."""

    images: list[int] = field(default_factory=list)
    correct: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    @property
    def labeled(self) -> bool:
        return bool(self.correct) and min(self.correct) >= 0

    def add(self, images: int, correct: int, seconds: float) -> None:
        self.images.append(int(images))
        self.correct.append(int(correct))
        self.seconds.append(round(float(seconds), 4))

    def windows(self, size: int) -> list[dict[str, float]]:
        """Consecutive windows of about `size` images (whole batches; a window closes at the first
        batch boundary at or past each multiple of `size`; the last may be shorter): start image,
        images, error % (None when unlabeled) and images/s of each."""
        if size < 1:
            raise ValueError(f"window size must be >= 1, got {size}")
        out: list[dict[str, float]] = []
        start = seen = correct = 0
        t0 = 0.0
        labeled = self.labeled
        for n, c, t in zip(self.images, self.correct, self.seconds):
            seen += n
            correct += c
            if seen - start >= size:
                out.append(self._window(start, seen - start, correct, t - t0, labeled))
                start, correct, t0 = seen, 0, t
        if seen > start:
            out.append(self._window(start, seen - start, correct, self.seconds[-1] - t0, labeled))
        return out

    @staticmethod
    def _window(start: int, n: int, correct: int, seconds: float, labeled: bool) -> dict[str, float]:
        return {
            "start": start,
            "images": n,
            "error": 100.0 * (1.0 - correct / n) if labeled else None,
            "images_per_s": n / seconds if seconds > 0 else float("nan"),
        }

    def to_dict(self) -> dict[str, list]:
        return {"images": list(self.images), "correct": list(self.correct), "seconds": list(self.seconds)}


class ErrorCounter:
    """Correct/seen counts per domain index, accumulated on the host from per-batch tensors."""

    def __init__(self, domains: list[str]) -> None:
        self.domains = list(domains)
        self._index = {d: i for i, d in enumerate(self.domains)}
        self.correct = torch.zeros(len(self.domains), dtype=torch.int64)
        self.seen = torch.zeros(len(self.domains), dtype=torch.int64)
        self.labeled = False

    def index(self, domain: str) -> int:
        i = self._index.get(domain)
        if i is None:  # a domain the stream did not announce: report it after the known ones
            i = self._index[domain] = len(self.domains)
            self.domains.append(domain)
            self.correct = torch.cat([self.correct, torch.zeros(1, dtype=torch.int64)])
            self.seen = torch.cat([self.seen, torch.zeros(1, dtype=torch.int64)])
        return i

    def add(self, domain: str, sample_domains: torch.Tensor | None, correct: torch.Tensor) -> None:
        """`correct`: bool (N,) on the host; `sample_domains`: int64 (N,) indices or None."""
        self.labeled = True
        if sample_domains is None:
            i = self.index(domain)
            self.correct[i] += int(correct.sum())
            self.seen[i] += int(correct.numel())
            return
        n = len(self.domains)
        if sample_domains.numel() and int(sample_domains.max()) >= n:
            raise IndexError(f"sample_domains index {int(sample_domains.max())} out of range for {n} domains")
        self.correct += torch.bincount(sample_domains, weights=correct.to(torch.float64), minlength=n).round().long()
        self.seen += torch.bincount(sample_domains, minlength=n)

    def add_wrong(self, domain: str, sample_domains: torch.Tensor | None, n: int) -> None:
        """Count `n` samples as seen and wrong (a skipped batch)."""
        self.add(domain, sample_domains, torch.zeros(n, dtype=torch.bool))

    def errors(self) -> dict[str, float]:
        return {d: 100.0 * (1.0 - int(c) / int(s)) for d, c, s in zip(self.domains, self.correct, self.seen) if s > 0}

    def running_accuracy(self) -> float:
        seen = int(self.seen.sum())
        return 100.0 * int(self.correct.sum()) / seen if seen else math.nan


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]); NaN for no values."""
    if not values:
        return math.nan
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q / 100.0))
