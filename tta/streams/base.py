"""What the engine consumes: a `Stream` is an iterable of `Batch` objects with known domains."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from tta.streams.names import RESETS, check_reset  # noqa: F401 - re-exported


@dataclass
class Batch:
    """One batch of a stream.

    x: float32 images (N, C, H, W) in [0, 1] (models normalise inside, RobustBench convention).
    y: int64 labels (N,) or None for unlabeled streams.
    domain: name of the schedule segment this batch belongs to (e.g. ``"gaussian_noise"``); a change
        of `domain` between consecutive batches is a domain shift (reset policy ``"domain"``).
    sample_domains: optional int64 (N,) indices into `Stream.domains` giving each sample's own domain
        (mixed-domain streams); per-domain error is then computed per sample.
    """

    x: torch.Tensor
    y: torch.Tensor | None
    domain: str
    sample_domains: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])


class Stream:
    """Base class of streams. Subclasses implement `__iter__` and set `domains`/`domain_sizes`.

    domains: report names in order of first appearance.
    domain_sizes: images per domain name (for progress bars); may be empty when unknown.
    """

    domains: list[str]
    domain_sizes: dict[str, int]

    def __iter__(self) -> Iterator[Batch]:  # pragma: no cover - interface
        raise NotImplementedError

    def __len__(self) -> int:
        """Number of batches (0 when unknown)."""
        return 0


class TensorStream(Stream):
    """A stream over in-memory domains: ``[(name, x, y), ...]`` split into batches in order."""

    def __init__(
        self,
        segments: Sequence[tuple[str, torch.Tensor, torch.Tensor | None]],
        batch_size: int,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.segments = list(segments)
        self.batch_size = batch_size
        self.domains = []
        for name, _, _ in self.segments:
            if name not in self.domains:
                self.domains.append(name)
        self.domain_sizes = {}
        for name, x, _ in self.segments:
            self.domain_sizes[name] = self.domain_sizes.get(name, 0) + int(x.shape[0])

    def __iter__(self) -> Iterator[Batch]:
        for name, x, y in self.segments:
            for i in range(0, x.shape[0], self.batch_size):
                yb = y[i : i + self.batch_size] if y is not None else None
                yield Batch(x[i : i + self.batch_size], yb, name)

    def __len__(self) -> int:
        return sum(-(-int(x.shape[0]) // self.batch_size) for _, x, _ in self.segments)
