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
    device: str = "cpu"
    amp: str | None = None
    predictions: torch.Tensor | None = field(default=None, repr=False)

    @property
    def accuracy(self) -> float | None:
        return None if self.mean_error is None else 100.0 - self.mean_error

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (predictions left out)."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "predictions"}


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
