"""AdaNPC (Zhang et al., ICML 2023) on the edge: a numpy kNN memory over a ``features`` export.

Mirrors `tta.adapters.adanpc` (the PyTorch adapter) row for row, so both give the same predictions
and their states convert into each other (`tta.export.adanpc_state_to_edge` / `edge_state_to_adanpc`):

- memory rows ``[source | test]`` in one preallocated array, L2-normalised; the source part (source
  training features with true labels) is pinned; ``stamps`` number test entries by insertion;
- predict: cosine top-k (k = min(k, rows)), weights = softmax(similarity / temperature), class
  scores = weighted label vote (probabilities; ``output_kind = "probs"``);
- adapt: features whose max score >= beta are appended with their pseudo-label (the reference's
  softmax-of-scores confidence behind ``softmax_confidence``);
- bounded memory: ``capacity`` rows in all (must exceed the source rows); when full, the newest
  ``capacity - source`` test entries survive (FIFO), written into the evicted rows in row order,
  exactly as `KnnMemory._evict_and_write`. (The PyTorch adapter's ``class_balanced`` eviction is not
  available on the edge.)

Defaults k = 100, temperature = 0.1, beta = 0.1 (paper); capacity None = unbounded (reference).
State files: safetensors (or .npz) with ``features``/``labels``/``stamps`` of the occupied rows and a
JSON header (num_source, next_stamp, num_classes, config, counters); never a pickle.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tta.edge.adapters import EdgeAdapter, check_state_path
from tta.edge.model import EdgeModel
from tta.errors import ConfigError, DataNotFoundError, InvalidInputError, StateMismatchError

STATE_FORMAT = "tta.edge.adanpc/1"
SOURCE_MEMORY_FORMAT = "tta-adanpc-memory/1"  # `tta build-memory` files (tta.adapters.adanpc.save_memory)
KNN_TILE = 16384  # memory rows per similarity tile: bounds the (B, tile) matrix, not the memory


@dataclass
class EdgeAdaNPCConfig:
    """Same names and defaults as `tta.adapters.adanpc.AdaNPCConfig` (the memory-related fields)."""

    k: int = 100
    temperature: float = 0.1
    beta: float = 0.1
    capacity: int | None = None
    storage_dtype: str = "float32"
    softmax_confidence: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.k <= 256:
            raise ConfigError(f"k must be in [1, 256], got {self.k}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.capacity is not None and self.capacity < 1:
            raise ConfigError(f"capacity must be >= 1 or None, got {self.capacity}")
        if self.storage_dtype not in ("float32", "float16"):
            raise ConfigError(f"storage_dtype must be 'float32' or 'float16', got {self.storage_dtype!r}")


def l2_normalize(f: np.ndarray) -> np.ndarray:
    f = f.astype(np.float32, copy=False)
    return f / np.maximum(np.sqrt((f * f).sum(axis=1, keepdims=True)), np.float32(1e-12))


def knn_vote(queries: np.ndarray, keys: np.ndarray, labels: np.ndarray, k: int, temperature: float,
             num_classes: int) -> np.ndarray:
    """Class probabilities (B, C) = softmax(top-k inner product / temperature) summed per label.

    `queries`/`keys` L2-normalised (inner product = cosine). The memory is scanned in tiles with a
    running top-k (argpartition), so memory use is O(B * (tile + k)) for any number of rows.
    """
    b, m = queries.shape[0], keys.shape[0]
    k = min(k, m)
    best_s = np.empty((b, 0), dtype=np.float32)
    best_i = np.empty((b, 0), dtype=np.int64)
    for start in range(0, m, KNN_TILE):
        tile = keys[start:start + KNN_TILE].astype(np.float32, copy=False)
        cand_s = np.concatenate([best_s, queries @ tile.T], axis=1)
        cand_i = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + tile.shape[0]), (b, tile.shape[0]))],
                                axis=1)
        if cand_s.shape[1] > k:
            part = np.argpartition(-cand_s, k - 1, axis=1)[:, :k]
            cand_s = np.take_along_axis(cand_s, part, axis=1)
            cand_i = np.take_along_axis(cand_i, part, axis=1)
        best_s, best_i = cand_s, cand_i
    logits = best_s / np.float32(temperature)
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    flat = (np.arange(b)[:, None] * num_classes + labels[best_i]).ravel()
    return np.bincount(flat, weights=weights.ravel(), minlength=b * num_classes).reshape(b, num_classes).astype(np.float32)


def load_source_memory(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, int]:
    """(features, labels, num_classes) of a source memory file written by `tta build-memory`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"no AdaNPC memory file at {path}; build one with `tta build-memory --model CARD`")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            features, labels = f.get_tensor("features"), f.get_tensor("labels")
    except Exception as exc:
        raise DataNotFoundError(f"{path} is not a readable AdaNPC memory file ({exc})") from exc
    if meta.get("format") != SOURCE_MEMORY_FORMAT:
        raise DataNotFoundError(f"{path}: not an AdaNPC memory file (format {meta.get('format')!r})")
    return features, labels.astype(np.int64), int(meta["num_classes"])


class EdgeAdaNPC(EdgeAdapter):
    """AdaNPC over a ``features`` export; returns class probabilities.

    source_features / source_labels: the pinned source memory, (N_src, D) and (N_src,): from
    `load_source_memory(models/<card>.memory.safetensors)`, `EdgeAdaNPC.source_memory(model, images,
    labels)`, or any later state via `load()`.
    """

    name = "adanpc"
    mode = "features"
    output_kind = "probs"

    def __init__(self, model: EdgeModel | str | os.PathLike[str], source_features: np.ndarray,
                 source_labels: np.ndarray, config: EdgeAdaNPCConfig | None = None,
                 providers: str | list[str] = "auto", **overrides: object) -> None:
        super().__init__(model, providers)
        if config is not None and overrides:
            raise ConfigError("pass either config or keyword overrides, not both")
        self.config = config if config is not None else EdgeAdaNPCConfig(**overrides)  # type: ignore[arg-type]
        self.num_classes = self.metadata.num_classes
        self.dim = self.metadata.output_dim
        self.counters.update({"appended": 0})
        self._set_source(source_features, source_labels)

    # ------------------------------------------------------------------ memory (mirrors KnnMemory)
    def _set_source(self, features: np.ndarray, labels: np.ndarray) -> None:
        features, labels = np.asarray(features), np.asarray(labels)
        if features.ndim != 2 or features.shape[1] != self.dim or features.shape[0] == 0:
            raise InvalidInputError(f"source features must be a non-empty (N, {self.dim}) array for this export, "
                                    f"got {features.shape}")
        if labels.shape != (features.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise InvalidInputError(f"need one integer label per source feature, got {labels.dtype} {labels.shape}")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise InvalidInputError(f"source labels must lie in [0, {self.num_classes})")
        if not np.isfinite(features).all():
            raise InvalidInputError("source features contain NaN/Inf")
        n, cap = features.shape[0], self.config.capacity
        if cap is not None and cap <= n:
            raise ConfigError(f"AdaNPC capacity {cap} leaves no room for test entries beside {n} source rows; "
                              f"use capacity > {n}")
        rows = cap if cap is not None else max(2 * n, 1024)
        self.features = np.zeros((rows, self.dim), dtype=self.config.storage_dtype)
        self.features[:n] = l2_normalize(features)
        self.labels = np.full(rows, -1, dtype=np.int64)
        self.labels[:n] = labels
        self.stamps = np.full(rows, -1, dtype=np.int64)
        self.num_source = self.size = n
        self.next_stamp = 0

    def __len__(self) -> int:
        return self.size

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(features (size, D), labels (size,)) of the occupied rows."""
        return self.features[: self.size], self.labels[: self.size]

    def add(self, features: np.ndarray, labels: np.ndarray) -> None:
        """Append L2-normalised `features` with `labels`, evicting the oldest test entries when full."""
        n = features.shape[0]
        if n == 0:
            return
        stamps = np.arange(self.next_stamp, self.next_stamp + n, dtype=np.int64)
        self.next_stamp += n
        if self.config.capacity is None and self.size + n > self.features.shape[0]:
            grow = max(self.size + n, 2 * self.features.shape[0]) - self.features.shape[0]
            self.features = np.concatenate([self.features, np.zeros((grow, self.dim), self.features.dtype)])
            self.labels = np.concatenate([self.labels, np.full(grow, -1, np.int64)])
            self.stamps = np.concatenate([self.stamps, np.full(grow, -1, np.int64)])
        if n <= self.features.shape[0] - self.size:
            slots = np.arange(self.size, self.size + n)
            self.size += n
        else:
            s, test_cap = self.num_source, self.features.shape[0] - self.num_source
            old = self.size - s
            pool = np.concatenate([self.stamps[s:self.size], stamps])
            keep = np.zeros(pool.shape[0], dtype=bool)
            keep[np.argsort(-pool, kind="stable")[:test_cap]] = True  # the newest test_cap entries
            keep_old, keep_new = keep[:old], keep[old:]
            free = np.concatenate([np.flatnonzero(~keep_old) + s, np.arange(self.size, s + test_cap)])
            slots = free[: int(keep_new.sum())]
            features, labels, stamps = features[keep_new], labels[keep_new], stamps[keep_new]
            self.size = s + test_cap
        self.features[slots] = features.astype(self.features.dtype)
        self.labels[slots] = labels
        self.stamps[slots] = stamps
        self.counters["appended"] += int(slots.shape[0])

    def vote(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(normalised features, class probabilities) against the memory, without updating it."""
        feats = l2_normalize(features)
        keys, labels = self.rows()
        return feats, knn_vote(feats, keys, labels, self.config.k, self.config.temperature, self.num_classes)

    def forward(self, x: np.ndarray) -> np.ndarray:
        feats, probs = self.vote(super().forward(x))
        if self.config.softmax_confidence:
            e = np.exp(probs - probs.max(axis=1, keepdims=True))
            confidence = (e / e.sum(axis=1, keepdims=True)).max(axis=1)
        else:
            confidence = probs.max(axis=1)
        keep = confidence >= self.config.beta
        self.add(feats[keep], probs[keep].argmax(axis=1))
        return probs

    def reset(self) -> None:
        """Drop every test entry; the pinned source memory stays."""
        super().reset()
        self.size = self.num_source
        self.next_stamp = 0

    @staticmethod
    def source_memory(model: EdgeModel, images: np.ndarray, labels: np.ndarray,
                      batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Features of source images (float [0, 1] NCHW) through the features export, with labels."""
        feats = [model.run(images[i:i + batch_size]) for i in range(0, images.shape[0], batch_size)]
        return np.concatenate(feats), np.asarray(labels, dtype=np.int64)

    # ------------------------------------------------------------------ state
    def state(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        arrays = {"features": np.ascontiguousarray(self.features[: self.size]),
                  "labels": self.labels[: self.size].copy(), "stamps": self.stamps[: self.size].copy()}
        header = {"format": STATE_FORMAT, "adapter": self.name, "num_source": str(self.num_source),
                  "next_stamp": str(self.next_stamp), "num_classes": str(self.num_classes),
                  "weights_sha256": self.metadata.weights_sha256, "config": json.dumps(asdict(self.config)),
                  "counters": json.dumps(self.counters)}
        return arrays, header

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write memory + config + counters atomically (.safetensors or .npz; no pickle)."""
        path = check_state_path(path)
        arrays, header = self.state()
        save_edge_state(path, arrays, header)
        return path

    def load(self, path: str | os.PathLike[str]) -> None:
        """Restore a state written by `save()` (or converted from the PyTorch adapter). Every check
        runs before anything changes."""
        arrays, header = read_edge_state(check_state_path(path))
        saved_sha = header.get("weights_sha256", "")
        if saved_sha and self.metadata.weights_sha256 and saved_sha != self.metadata.weights_sha256:
            raise StateMismatchError(f"{path} was saved with a different feature extractor (weights {saved_sha[:12]} != "
                                     f"{self.metadata.weights_sha256[:12]}); its memory does not fit this model")
        try:
            feats, labels, stamps = arrays["features"], arrays["labels"].astype(np.int64), arrays["stamps"].astype(np.int64)
            num_source, next_stamp = int(header["num_source"]), int(header["next_stamp"])
            config = EdgeAdaNPCConfig(**json.loads(header["config"]))
            counters = {k: int(v) for k, v in json.loads(header.get("counters", "{}")).items()}
            num_classes = int(header["num_classes"])
        except (KeyError, ValueError, TypeError) as exc:
            raise StateMismatchError(f"{path}: incomplete AdaNPC state ({type(exc).__name__}: {exc})") from exc
        size = feats.shape[0]
        if feats.ndim != 2 or feats.shape[1] != self.dim or labels.shape != (size,) or stamps.shape != (size,) \
                or not 0 < num_source <= size:
            raise StateMismatchError(f"{path}: memory of shape {feats.shape} / labels {labels.shape} does not fit this "
                                     f"{self.dim}-dim features export")
        if num_classes != self.num_classes or labels.min() < 0 or labels.max() >= self.num_classes:
            raise StateMismatchError(f"{path}: memory labels/classes do not fit this {self.num_classes}-class export")
        if config.capacity is not None and size > config.capacity:
            raise StateMismatchError(f"{path}: {size} memory rows exceed the saved capacity {config.capacity}")
        if not np.isfinite(feats.astype(np.float32)).all():
            raise StateMismatchError(f"{path}: memory contains NaN/Inf")
        self.config = config
        rows = config.capacity if config.capacity is not None else max(2 * size, 1024)
        self.features = np.zeros((rows, self.dim), dtype=config.storage_dtype)
        self.features[:size] = feats
        self.labels = np.full(rows, -1, np.int64)
        self.labels[:size] = labels
        self.stamps = np.full(rows, -1, np.int64)
        self.stamps[:size] = stamps
        self.size, self.num_source, self.next_stamp = size, num_source, next_stamp
        self.counters = {"batches": 0, "small_batches": 0, "appended": 0, **counters}


def save_edge_state(path: Path, arrays: dict[str, np.ndarray], header: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.numpy import save_file

            save_file(arrays, str(tmp), metadata=header)
        else:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays, __header__=np.array(json.dumps(header)))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_edge_state(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    if not path.is_file():
        raise StateMismatchError(f"no AdaNPC state file at {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                header = dict(f.metadata() or {})
                arrays = {k: f.get_tensor(k) for k in f.keys()}
        else:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
            header = json.loads(str(arrays.pop("__header__")))
    except Exception as exc:  # truncated / not a state file
        raise StateMismatchError(f"{path} is not a readable AdaNPC state ({type(exc).__name__}: {exc})") from exc
    if header.get("format") != STATE_FORMAT or header.get("adapter") != "adanpc":
        raise StateMismatchError(f"{path} is not an edge AdaNPC state (format {header.get('format')!r})")
    return arrays, header
