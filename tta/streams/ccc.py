"""Continuously changing corruptions in the manner of CCC (Press et al., "RDumb: A simple approach that
questions our progress in continual test-time adaptation", NeurIPS 2023; code: oripress/CCC).

Every image is corrupted twice, by corruption A at severity s1 and then by corruption B at s2. A
*transition* from A to B walks a monotone path on the (s1, s2) severity grid from (s1 > 0, s2 = 0)
(A alone) to (0, s2 > 0) (B alone): each step lowers s1 or raises s2 by one grid step. The next
transition starts where this one ended (B at the same severity, now the first corruption) and heads
for a new corruption drawn at random, so the stream never jumps. The path of each pair is the one
that keeps the *source model's accuracy* closest to a target all along (minimum sum of squared
deviations over the path's grid cells, by dynamic programming over the grid); the target sets the
difficulty (`DIFFICULTIES`). The accuracies come from a `CCCCalibration`: the source model's accuracy
on every grid cell of every ordered pair, measured once (`calibrate`, CLI ``tta calibrate-ccc``) and
stored as a small JSON file next to the stream specs; the corrupted images themselves are never
stored (`tta.streams.generated.GeneratedStream` corrupts each batch when it is drawn).

What follows CCC and what differs (CCC is ImageNet at 224 px and a ResNet-50 baseline):
- severities are continuous: the constants are interpolated between integer severities, severity 0
  being the clean image (`tta.streams.corruptions`); CCC does the same with its own table;
- CCC calibrates on a uniform 0.25 grid with a greedy path rule aiming at the path's *mean*
  accuracy; here the grid (`GRID`, 11 levels: 100 cells per ordered pair) is fine near 0, where this
  source model's accuracy falls steeply, and coarse above 2, where it is flat; between two grid cells
  the severities move linearly batch by batch, so the stream is smooth at any grid step; the path
  minimises squared deviations so the difficulty is held at every point, not only on average;
- speed (CCC: 1000, 2000 or 5000 images per 0.25-severity step; `SPEEDS`) keeps that unit: images per
  0.25 of severity change;
- a difficulty uses only corruptions that can reach its target on their own (at their strongest
  severity within `TOLERANCE` points of the target), as CCC drops brightness from its easy level;
- the easy / medium / hard targets (`DIFFICULTIES`) are source-model accuracies chosen for this
  10-class setting (see the constant), not CCC's ImageNet values 40 / 20 / 0 %.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tta.errors import ConfigError, DataNotFoundError
from tta.fileio import write_text_atomic
from tta.streams.corruptions import CORRUPTIONS, STANDARD_ORDER, corrupt
from tta.streams.generated import BatchPlan
from tta.streams.names import DIFFICULTIES  # noqa: F401 - re-exported
from tta.streams.settings import to_tensor

#: calibration grid of severities (0 = clean): fine near 0, where the source model's accuracy falls fastest
#: (frost, fog, brightness and contrast lose 40-60 points by severity 0.5), coarse above 2, where it is flat
GRID: tuple[float, ...] = (0.0, 0.125, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0)
#: CCC's transition speeds: images per 0.25 of severity change
SPEEDS: tuple[int, ...] = (1000, 2000, 5000)
#: a corruption joins a difficulty when its accuracy at its strongest severity is <= target + this
TOLERANCE = 5.0
FORMAT = "tta-ccc-calibration/1"


@dataclass
class CCCCalibration:
    """The source model's accuracy (%) on the severity grid of single corruptions and ordered pairs.

    single[c][i]: accuracy on corruption c at ``grid[i]`` (index 0 = clean).
    pairs[(a, b)][i, j]: accuracy on a at ``grid[i]`` then b at ``grid[j]``, for i, j >= 1.
    """

    grid: tuple[float, ...]
    clean: float
    single: dict[str, list[float]]
    pairs: dict[tuple[str, str], np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)

    def pair(self, a: str, b: str) -> np.ndarray:
        """The full (G, G) accuracy matrix of a then b (row 0: b alone, column 0: a alone)."""
        inner = self.pairs.get((a, b))
        if inner is None:
            raise ConfigError(f"the CCC calibration has no pair {a} -> {b}; calibrated pairs cover "
                              f"{', '.join(self.pair_corruptions)}")
        g = len(self.grid)
        full = np.empty((g, g))
        full[0, :] = self.single[b]
        full[:, 0] = self.single[a]
        full[1:, 1:] = inner
        return full

    @property
    def pair_corruptions(self) -> list[str]:
        return sorted({c for pair in self.pairs for c in pair})

    def corruptions_for(self, target: float, tolerance: float = TOLERANCE) -> list[str]:
        """Corruptions of the calibrated pairs that reach `target` accuracy on their own (+ tolerance)."""
        return [c for c in self.pair_corruptions if min(self.single[c]) <= target + tolerance]

    # ------------------------------------------------------------------ file
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "grid": list(self.grid),
            "clean": round(self.clean, 3),
            "single": {c: [round(v, 3) for v in accs] for c, accs in self.single.items()},
            "pairs": {f"{a}>{b}": np.round(m, 3).tolist() for (a, b), m in self.pairs.items()},
            "meta": self.meta,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_text_atomic(path, json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "CCCCalibration":
        path = Path(path)
        if not path.is_file():
            raise DataNotFoundError(f"no CCC calibration file at {path}; make one with `tta calibrate-ccc`")
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path} is not a readable CCC calibration (JSON): {exc}") from exc
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ConfigError(f"{path} is not a CCC calibration (format {FORMAT!r} expected)")
        try:
            grid = tuple(float(s) for s in raw["grid"])
            g = len(grid)
            single = {str(c): [float(v) for v in accs] for c, accs in raw["single"].items()}
            pairs = {}
            for key, rows in raw["pairs"].items():
                a, b = key.split(">")
                pairs[(a, b)] = np.asarray(rows, dtype=np.float64)
            clean = float(raw["clean"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"{path}: malformed CCC calibration ({type(exc).__name__}: {exc})") from exc
        if g < 2 or grid[0] != 0.0 or any(b <= a for a, b in zip(grid, grid[1:])) or grid[-1] > 5.0:
            raise ConfigError(f"{path}: the grid must rise from 0 to at most 5, got {grid}")
        for c, accs in single.items():
            if c not in CORRUPTIONS or len(accs) != g:
                raise ConfigError(f"{path}: single-corruption row {c!r} is unknown or not {g} long")
        for (a, b), m in pairs.items():
            if a not in single or b not in single or m.shape != (g - 1, g - 1):
                raise ConfigError(f"{path}: pair {a}>{b} needs both single rows and a {g - 1}x{g - 1} matrix")
        return cls(grid, clean, single, pairs, dict(raw.get("meta") or {}))


# ---------------------------------------------------------------------------------------------
# measuring


@torch.inference_mode()
def _accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, groups: int, device: torch.device,
              chunk: int) -> list[float]:
    """Accuracy (%) of `model` on each of `groups` equal consecutive groups of (images, labels)."""
    preds = []
    for i in range(0, len(images), chunk):
        x = to_tensor(images[i : i + chunk]).to(device)
        preds.append(model(x).argmax(1).cpu())
    hits = (torch.cat(preds) == torch.from_numpy(labels)).double().view(groups, -1).mean(1) * 100
    return hits.tolist()


def calibrate(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    corruptions: Sequence[str] = STANDARD_ORDER,
    pair_corruptions: Sequence[str] | None = None,
    n: int = 100,
    grid: Sequence[float] = GRID,
    seed: int = 0,
    device: str | torch.device = "cpu",
    chunk: int = 1000,
    log: Callable[[str], None] | None = None,
) -> CCCCalibration:
    """Measure the source model's accuracy on the severity grid (see `CCCCalibration`).

    Every first corruption at a grid severity, (c, s), gets its own `n` images drawn from `images`;
    the single-corruption cell (c, s) and every pair cell (c at s, then b at any s2) use them, so a
    row of a pair's matrix shares its images (smooth along s2) while different rows and corruptions
    see different samples (no shared sampling bias: one fixed subset of 50 easy images would raise
    every cell by the same few points). Single corruptions are measured for every name in
    `corruptions`; ordered pairs for `pair_corruptions` (default: the corruptions that can reach the
    easiest difficulty's target, the largest set any difficulty uses). Cost: len(grid) - 1 cells per
    corruption plus (len(grid) - 1)^2 per ordered pair, `n` images each.
    """
    grid = tuple(float(s) for s in grid)
    unknown = [c for c in corruptions if c not in CORRUPTIONS]
    if unknown:
        raise ConfigError(f"unknown corruptions {unknown}")
    if n < 1 or n > len(images):
        raise ConfigError(f"n must be in 1..{len(images)}, got {n}")
    log = log or (lambda _msg: None)
    dev = torch.device(device)
    model = model.to(dev).eval()
    labels = np.asarray(labels).astype(np.int64)
    index = {c: k for k, c in enumerate(CORRUPTIONS)}
    cells = len(grid) - 1

    def sample(c: str, i: int) -> np.ndarray:
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index[c], i)))
        return np.sort(rng.choice(len(images), n, replace=False))

    def first(c: str, i: int) -> tuple[np.ndarray, np.ndarray]:
        """n images corrupted by c at grid[i], and their labels: the same in singles and pairs."""
        pick = sample(c, i)
        x = corrupt(images[pick], c, grid[i], seed=np.random.SeedSequence(seed, spawn_key=(index[c], i)))
        return x, labels[pick]

    clean_pick = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(len(CORRUPTIONS),))).choice(
        len(images), min(len(images), n * cells), replace=False)
    clean = _accuracy(model, images[clean_pick], labels[clean_pick], 1, dev, chunk)[0]
    single: dict[str, list[float]] = {}
    for c in corruptions:
        rows = [first(c, i) for i in range(1, len(grid))]
        accs = _accuracy(model, np.concatenate([x for x, _ in rows]), np.concatenate([y for _, y in rows]), cells,
                         dev, chunk)
        single[c] = [clean, *accs]
        log(f"{c}: " + " ".join(f"{a:.1f}" for a in single[c]))
    if pair_corruptions is None:
        easiest = max(DIFFICULTIES.values())
        pair_corruptions = [c for c in corruptions if min(single[c]) <= easiest + TOLERANCE]
    missing = [c for c in pair_corruptions if c not in single]
    if missing:
        raise ConfigError(f"pair corruptions {missing} are not among the calibrated corruptions")
    pairs: dict[tuple[str, str], np.ndarray] = {
        (a, b): np.empty((cells, cells)) for a in pair_corruptions for b in pair_corruptions if a != b
    }
    for a in pair_corruptions:
        for i in range(1, len(grid)):
            xa, ya = first(a, i)
            for b in pair_corruptions:
                if b == a:
                    continue
                stacked = np.concatenate([
                    corrupt(xa, b, grid[j], seed=np.random.SeedSequence(seed, spawn_key=(index[a], i, index[b], j)))
                    for j in range(1, len(grid))
                ])
                pairs[(a, b)][i - 1] = _accuracy(model, stacked, np.tile(ya, cells), cells, dev, chunk)
        log(f"pairs from {a}: done")
    meta = {"images": n, "seed": seed, "sampling": "n images per (first corruption, severity)"}
    return CCCCalibration(grid, clean, single, pairs, meta)


# ---------------------------------------------------------------------------------------------
# walking


def best_path(acc: np.ndarray, target: float, start: int | None = None) -> list[tuple[int, int]]:
    """The monotone grid path from (start, 0) to some (0, j >= 1) (steps: i - 1 or j + 1) whose cells'
    accuracies deviate least from `target` (mean squared deviation; exact, by dynamic programming).
    `start` None tries every start i >= 1."""
    g = acc.shape[0]
    dev = (acc - target) ** 2
    starts = range(1, g) if start is None else [start]
    best: tuple[float, list[tuple[int, int]]] | None = None
    for i0 in starts:
        if not 1 <= i0 < g:
            raise ConfigError(f"path start {i0} outside 1..{g - 1}")
        cost = np.full((i0 + 1, g), np.inf)
        came: dict[tuple[int, int], tuple[int, int]] = {}
        for i in range(i0, -1, -1):
            for j in range(g):
                if i == i0 and j == 0:
                    cost[i, j] = dev[i, j]
                    continue
                up = cost[i + 1, j] if i + 1 <= i0 else np.inf  # came from a higher s1
                left = cost[i, j - 1] if j >= 1 else np.inf  # came from a lower s2
                if up == np.inf and left == np.inf:
                    continue
                prev = (i + 1, j) if up <= left else (i, j - 1)
                cost[i, j] = dev[i, j] + min(up, left)
                came[(i, j)] = prev
        for j in range(1, g):
            mean = cost[0, j] / (i0 + j + 1)  # every path from (i0, 0) to (0, j) has i0 + j + 1 cells
            if best is None or mean < best[0]:
                path = [(0, j)]
                while path[-1] != (i0, 0):
                    path.append(came[path[-1]])
                best = (mean, path[::-1])
    assert best is not None
    return best[1]


def _step_size(grid: Sequence[float], p: tuple[int, int], q: tuple[int, int]) -> float:
    """Severity change of one path step (one of the two severities moves)."""
    return abs(grid[p[0]] - grid[q[0]]) + abs(grid[p[1]] - grid[q[1]])


@dataclass
class Transition:
    """One transition of a CCC walk: corruption `a` to `b` along grid `path`, from stream image `start`;
    `steps`: images spent on each path step (from cell m to m + 1)."""

    a: str
    b: str
    path: list[tuple[int, int]]
    start: int
    steps: list[float]

    def __post_init__(self) -> None:
        self.ends = np.cumsum(self.steps)

    @property
    def images(self) -> int:
        return int(round(float(self.ends[-1])))

    @property
    def domain(self) -> str:
        return f"{self.a}>{self.b}"


def ccc_plans(
    calibration: CCCCalibration,
    *,
    target: float,
    speed: int,
    length: int,
    batch_size: int,
    seed: int = 0,
    tolerance: float = TOLERANCE,
) -> tuple[list[BatchPlan], list[Transition]]:
    """Batch plans of a CCC stream of `length` images (and its transitions, for reports).

    Severities move linearly between the path's grid cells: a step that changes a severity by d takes
    ``speed * d / 0.25`` images; each batch takes the severities at its middle image.
    """
    for name, value in (("speed", speed), ("length", length), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    names = calibration.corruptions_for(target, tolerance)
    if len(names) < 2:
        raise ConfigError(f"CCC at {target}% source accuracy needs two calibrated corruptions that reach it; "
                          f"found {names or 'none'}")
    grid = calibration.grid
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(3,)))

    def pick(exclude: str | None) -> str:
        choices = [c for c in names if c != exclude]
        return choices[int(rng.integers(len(choices)))]

    a = pick(None)
    b = pick(a)
    path = best_path(calibration.pair(a, b), target)
    transitions: list[Transition] = []
    start = 0
    while start < length:
        tr = Transition(a, b, path, start, [speed * _step_size(grid, p, q) / 0.25 for p, q in zip(path, path[1:])])
        transitions.append(tr)
        start += tr.images
        a, b = b, pick(b)
        path = best_path(calibration.pair(a, b), target, start=path[-1][1])

    plans: list[BatchPlan] = []
    t = 0
    k = 0
    while t < length:
        size = min(batch_size, length - t)
        mid = t + size / 2
        while k + 1 < len(transitions) and mid >= transitions[k + 1].start:
            k += 1
        tr = transitions[k]
        elapsed = mid - tr.start
        m = min(int(np.searchsorted(tr.ends, elapsed, side="right")), len(tr.steps) - 1)
        f = min(1.0, (elapsed - (tr.ends[m] - tr.steps[m])) / tr.steps[m])
        (i1, j1), (i2, j2) = tr.path[m], tr.path[m + 1]
        s1 = (1 - f) * grid[i1] + f * grid[i2]
        s2 = (1 - f) * grid[j1] + f * grid[j2]
        plans.append(BatchPlan(tr.domain, size, ((tr.a, round(s1, 2)), (tr.b, round(s2, 2)))))
        t += size
    return plans, transitions


__all__ = ["CCCCalibration", "DIFFICULTIES", "GRID", "SPEEDS", "TOLERANCE", "Transition", "best_path", "calibrate",
           "ccc_plans"]
