"""Streams corrupted on the fly: clean images + a schedule of corruptions, nothing stored, any length.

A `GeneratedStream` walks a list of `BatchPlan`s. Each plan names its report domain, its size and
the corruptions applied to its images in order, each at a (possibly fractional) severity; the batched
generator (`tta.streams.corruptions.corrupt`) corrupts each batch when it is drawn, so the cost is
paid per batch (the engine's background prefetch overlaps it with adaptation) and a stream of any
length needs only the clean set in memory.

Images are drawn without replacement within an epoch: the stream's image order is a concatenation of
seeded permutations of the clean set, and batch k takes the next `size` images of that sequence.
Every random number of batch k (its epoch permutation, its corruption noise) comes from a seed derived
from (`seed`, k), so any batch can be regenerated alone: `iter_from(k)` resumes a stream at batch k
with exactly the batches an uninterrupted run would have seen.

- `recurring_plans`: the domain sequence repeated R times (Hoang et al., "Persistent Test-time
  Adaptation in Recurring Testing Scenarios", NeurIPS 2024: 20 recurrences of the CIFAR-10-C order).
- `tta.streams.ccc`: continuously changing corruptions (CCC, Press et al., NeurIPS 2023).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tta.errors import ConfigError
from tta.streams.base import Batch, Stream
from tta.streams.corruptions import CORRUPTIONS, corrupt
from tta.streams.base import check_reset
from tta.streams.settings import to_tensor

# SeedSequence spawn keys: one independent random stream per purpose and index
_EPOCH, _NOISE = 1, 2


@dataclass(frozen=True)
class BatchPlan:
    """One batch of a generated stream: `size` images, corrupted by `corruptions` in order.

    corruptions: ``((name, severity), ...)``; severity in [0, 5] (0 = not applied).
    """

    domain: str
    size: int
    corruptions: tuple[tuple[str, float], ...]


class GeneratedStream(Stream):
    """Batches of `images` (uint8 NHWC) corrupted on the fly following `plans` (see the module doc)."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | None,
        plans: Sequence[BatchPlan],
        *,
        seed: int = 0,
        reset: str | int = "never",
    ) -> None:
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ConfigError(f"generated streams need clean uint8 images (N, H, W, 3), got "
                              f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}")
        if len(images) == 0:
            raise ConfigError("generated streams need at least one clean image")
        if labels is not None and len(labels) != len(images):
            raise ConfigError(f"{len(images)} images but {len(labels)} labels")
        for plan in plans:
            if plan.size < 1:
                raise ConfigError(f"batch plan of domain {plan.domain!r} has size {plan.size}")
            for name, sev in plan.corruptions:
                if name not in CORRUPTIONS:
                    raise ConfigError(f"unknown corruption {name!r} in the plan of domain {plan.domain!r}")
                if not 0.0 <= float(sev) <= 5.0:
                    raise ConfigError(f"severity {sev} of {name} is outside 0..5")
        self.images = images
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.plans = list(plans)
        self.seed = int(seed)
        self.reset = check_reset(reset)
        self.batch_size = max((p.size for p in self.plans), default=0)
        self.offsets = np.concatenate([[0], np.cumsum([p.size for p in self.plans])]).astype(np.int64)
        self.domains: list[str] = []
        self.domain_sizes: dict[str, int] = {}
        for p in self.plans:
            if p.domain not in self.domain_sizes:
                self.domains.append(p.domain)
                self.domain_sizes[p.domain] = 0
            self.domain_sizes[p.domain] += p.size
        self._perms: dict[int, np.ndarray] = {}

    @property
    def num_images(self) -> int:
        return int(self.offsets[-1])

    def __len__(self) -> int:
        return len(self.plans)

    def _epoch(self, e: int) -> np.ndarray:
        perm = self._perms.get(e)
        if perm is None:
            rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(_EPOCH, e)))
            perm = rng.permutation(len(self.images))
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[e] = perm
        return perm

    def indices(self, k: int) -> np.ndarray:
        """Clean-set indices of the images of batch `k`."""
        n = len(self.images)
        start, stop = int(self.offsets[k]), int(self.offsets[k + 1])
        parts = []
        pos = start
        while pos < stop:
            e, i = divmod(pos, n)
            take = min(stop - pos, n - i)
            parts.append(self._epoch(e)[i : i + take])
            pos += take
        return np.concatenate(parts)

    def batch(self, k: int) -> Batch:
        """Batch `k`, generated alone (the same as the k-th batch of a full iteration)."""
        plan = self.plans[k]
        idx = self.indices(k)
        x = self.images[idx]
        for j, (name, sev) in enumerate(plan.corruptions):
            if sev > 0:
                x = corrupt(x, name, float(sev), seed=np.random.SeedSequence(self.seed, spawn_key=(_NOISE, k, j)))
        y = None if self.labels is None else torch.from_numpy(self.labels[idx])
        return Batch(to_tensor(x), y, plan.domain)

    def iter_from(self, start: int) -> Iterator[Batch]:
        for k in range(start, len(self.plans)):
            yield self.batch(k)

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)


def recurring_plans(
    corruptions: Sequence[str],
    severity: float,
    n_per_domain: int,
    recurrences: int,
    batch_size: int,
) -> list[BatchPlan]:
    """The domain sequence `corruptions` (at `severity`) repeated `recurrences` times, `n_per_domain`
    images per visit, batches of `batch_size` (a visit's last batch may be smaller)."""
    for name, value in (("n_per_domain", n_per_domain), ("recurrences", recurrences), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    if not corruptions:
        raise ConfigError("a recurring stream needs at least one corruption")
    sizes = [min(batch_size, n_per_domain - i) for i in range(0, n_per_domain, batch_size)]
    return [
        BatchPlan(name, size, ((name, float(severity)),))
        for _ in range(recurrences)
        for name in corruptions
        for size in sizes
    ]


__all__ = ["BatchPlan", "GeneratedStream", "recurring_plans"]
