"""Continual test-time adaptation settings as `Stream`s over `DomainData`.

- `ContinualStream`: domains one after the other (the standard CTTA protocol: the 15 corruptions at
  severity 5 in `STANDARD_ORDER`, model reset once before the first domain). The reset policy is a
  plain attribute the engine reads (`reset`: "never" = continual, "domain" = reset_each_shift, or
  N = every N batches, see `check_reset`).
- `GradualStream`: per corruption, severities 1, 2, 3, 4, 5, 4, 3, 2, 1 (CoTTA's gradual setting);
  `first_from_5` starts the first corruption at 5, 4, 3, 2, 1 (the model has not seen a mild
  severity first).
- `MixedDomainStream`: the samples of all domains shuffled together (every batch mixes domains);
  `Batch.sample_domains` gives each sample's domain for per-domain error.
Within a domain, `order` is "shuffle" (seeded permutation), "file" (stored order) or "dirichlet":
non-i.i.d. label order (Gong et al., NOTE, NeurIPS 2022; Yuan et al., RoTTA, CVPR 2023): the domain is
cut into `slots` consecutive time slots, each class's samples are spread over the slots with
proportions drawn from Dir(concentration), and a slot plays its class chunks one after the other
(RoTTA's label-Dirichlet sampler); small concentrations give long single-class runs, large ones
approach i.i.d. `n_per_domain` keeps the first n samples of the order (shuffle/file) or n
samples drawn at random before the Dirichlet ordering.
Batches are float32 NCHW tensors in [0, 1] (uint8 NHWC / 255).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tta.errors import ConfigError
from tta.streams.base import Batch, Stream, check_reset
from tta.streams.datasets import DomainData
from tta.streams.names import ORDERS, RESETS  # noqa: F401 - re-exported


@dataclass
class Segment:
    """`indices` of `data` shown, in this order, under report name `domain`."""

    domain: str
    data: DomainData
    indices: np.ndarray


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float().div_(255)


def dirichlet_order(labels: np.ndarray, concentration: float, rng: np.random.Generator, slots: int | None = None) -> np.ndarray:
    """Indices of `labels` in a non-i.i.d. order: each class is split over `slots` consecutive time
    slots with Dir(concentration) proportions; a slot shows its class chunks one after the other in
    random order. Default slots: the number of classes."""
    if concentration <= 0:
        raise ConfigError(f"Dirichlet concentration must be > 0, got {concentration}")
    classes = np.unique(labels)
    slots = slots or len(classes)
    buckets: list[list[np.ndarray]] = [[] for _ in range(slots)]
    for c in classes:
        idx = rng.permutation(np.nonzero(labels == c)[0])
        props = rng.dirichlet(np.full(slots, concentration))
        cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
        for k, part in enumerate(np.split(idx, cuts)):
            buckets[k].append(part)
    # inside a slot the class chunks come in random order, each chunk contiguous (as RoTTA's sampler)
    parts = [bucket[i] for bucket in buckets for i in rng.permutation(len(bucket))]
    return np.concatenate(parts).astype(np.int64)


def order_indices(
    data: DomainData,
    order: str,
    n: int | None,
    rng: np.random.Generator,
    concentration: float | None = None,
) -> np.ndarray:
    total = len(data)
    n = total if n is None else min(int(n), total)
    if order == "file":
        return np.arange(n, dtype=np.int64)
    if order == "shuffle":
        return rng.permutation(total)[:n].astype(np.int64)
    if order == "dirichlet":
        if data.labels is None:
            raise ConfigError("order='dirichlet' needs labelled data")
        if concentration is None:
            raise ConfigError("order='dirichlet' needs a concentration")
        subset = np.sort(rng.permutation(total)[:n]) if n < total else np.arange(total)
        return subset[dirichlet_order(data.labels[subset], concentration, rng)]
    raise ConfigError(f"order must be one of {ORDERS}, got {order!r}")


class SegmentStream(Stream):
    """Segments shown one after the other, split into batches (a batch never spans two segments)."""

    def __init__(self, segments: Sequence[Segment], batch_size: int, reset: str | int = "never") -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.segments = list(segments)
        self.batch_size = int(batch_size)
        self.reset = check_reset(reset)
        self.domains = []
        self.domain_sizes = {}
        for seg in self.segments:
            if seg.domain not in self.domains:
                self.domains.append(seg.domain)
            self.domain_sizes[seg.domain] = self.domain_sizes.get(seg.domain, 0) + len(seg.indices)

    def __iter__(self) -> Iterator[Batch]:
        for seg in self.segments:
            for i in range(0, len(seg.indices), self.batch_size):
                idx = seg.indices[i : i + self.batch_size]
                y = None if seg.data.labels is None else torch.from_numpy(seg.data.labels[idx])
                yield Batch(to_tensor(seg.data.images(idx)), y, seg.domain)

    def __len__(self) -> int:
        return sum(-(-len(seg.indices) // self.batch_size) for seg in self.segments)


class ContinualStream(SegmentStream):
    """Domains ``[(name, data), ...]`` in the given order (continual / reset_each_shift)."""

    def __init__(
        self,
        domains: Sequence[tuple[str, DomainData]],
        batch_size: int,
        *,
        n_per_domain: int | None = None,
        order: str = "shuffle",
        concentration: float | None = None,
        seed: int = 0,
        reset: str | int = "never",
    ) -> None:
        rng = np.random.default_rng(seed)
        segments = [Segment(name, data, order_indices(data, order, n_per_domain, rng, concentration)) for name, data in domains]
        super().__init__(segments, batch_size, reset)


def gradual_severities(first_from_5: bool, is_first: bool) -> list[int]:
    if is_first and first_from_5:
        return [5, 4, 3, 2, 1]
    return [1, 2, 3, 4, 5, 4, 3, 2, 1]


class GradualStream(SegmentStream):
    """Per corruption, severities 1..5..1 (optionally 5..1 for the first corruption).

    domains: ``{corruption: {severity: data}}`` in corruption order. Report names are
    ``"<corruption>@<severity>"``; each visit of a severity draws its own `n_per_domain` samples.
    """

    def __init__(
        self,
        domains: dict[str, dict[int, DomainData]],
        batch_size: int,
        *,
        first_from_5: bool = False,
        n_per_domain: int | None = None,
        order: str = "shuffle",
        concentration: float | None = None,
        seed: int = 0,
        reset: str | int = "never",
    ) -> None:
        rng = np.random.default_rng(seed)
        segments = []
        for k, (corruption, by_severity) in enumerate(domains.items()):
            for sev in gradual_severities(first_from_5, k == 0):
                if sev not in by_severity:
                    raise ConfigError(f"gradual stream needs severity {sev} of {corruption}")
                data = by_severity[sev]
                segments.append(Segment(f"{corruption}@{sev}", data, order_indices(data, order, n_per_domain, rng, concentration)))
        super().__init__(segments, batch_size, reset)
        self.severity_sequence = [int(s.domain.rsplit("@", 1)[1]) for s in self.segments]


class MixedDomainStream(Stream):
    """All domains' samples (n_per_domain each) shuffled together; `Batch.domain` is "mixed" and
    `Batch.sample_domains` indexes `domains` per sample."""

    def __init__(
        self,
        domains: Sequence[tuple[str, DomainData]],
        batch_size: int,
        *,
        n_per_domain: int | None = None,
        seed: int = 0,
        reset: str | int = "never",
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        rng = np.random.default_rng(seed)
        self.batch_size = int(batch_size)
        self.reset = check_reset(reset)
        self.data = [data for _, data in domains]
        self.domains = [name for name, _ in domains]
        picks = [order_indices(data, "shuffle", n_per_domain, rng) for data in self.data]
        self.domain_sizes = {name: len(p) for name, p in zip(self.domains, picks)}
        which = np.concatenate([np.full(len(p), d, dtype=np.int64) for d, p in enumerate(picks)])
        where = np.concatenate(picks)
        perm = rng.permutation(len(which))
        self.sample_domain = which[perm]
        self.sample_index = where[perm]
        self.labelled = all(d.labels is not None for d in self.data)

    def __iter__(self) -> Iterator[Batch]:
        for i in range(0, len(self.sample_domain), self.batch_size):
            dom = self.sample_domain[i : i + self.batch_size]
            idx = self.sample_index[i : i + self.batch_size]
            images = None
            labels = np.empty(len(idx), dtype=np.int64)
            for d in np.unique(dom):  # one gather per domain present in the batch
                rows = np.nonzero(dom == d)[0]
                part = self.data[d].images(idx[rows])
                if images is None:
                    images = np.empty((len(idx),) + part.shape[1:], dtype=np.uint8)
                images[rows] = part
                if self.labelled:
                    labels[rows] = self.data[d].labels[idx[rows]]
            y = torch.from_numpy(labels) if self.labelled else None
            yield Batch(to_tensor(images), y, "mixed", torch.from_numpy(dom.copy()))

    def __len__(self) -> int:
        return -(-len(self.sample_domain) // self.batch_size)
