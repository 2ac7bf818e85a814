"""AdaNPC (Zhang et al., ICML 2023, "AdaNPC: Exploring Non-Parametric Classifier for Test-Time
Adaptation"): a kNN classifier over a memory of L2-normalised penultimate features.

Per batch: features f of the (frozen) model, cosine top-k over the memory, class scores =
sum of softmax(similarity / tau)-weighted one-hot labels (the fused `tta.ops.knn_vote`); the
scores are the prediction (probabilities: ``output_kind = "probs"``). Features whose confidence
(max score) is >= beta are appended with their pseudo-label. Defaults k=100, tau=0.1, beta=0.1.

Memory: initialised with source features and their true labels (`build_source_memory`, the
``tta build-memory --model CARD`` command writes ``<card>.memory.safetensors``); the source
part is pinned, `reset()` truncates back to it. Beyond the reference (which grows without bound):
``capacity`` bounds the total rows, evicting test entries first-in-first-out or, with
``class_balanced``, the oldest entries of the class holding most test entries; ``storage_dtype``
"float16" halves the memory (similarities are still accumulated in fp32).

Reference quirk (off by default): the reference computes the confidence as a softmax over the
already-normalised scores, which caps it near 0.23 for 10 classes; ``softmax_confidence=True``
reproduces it. Note that with beta=0.1 and 10 classes every feature passes (max score >= 1/C).

Composition with a normalisation adapter: ``norm`` chooses how the feature extractor normalises
its BatchNorm layers: ``"source"`` (frozen source model, the paper), ``"bn"`` (test-batch
statistics) or ``"alpha-bn"`` (mix with ``source_weight`` on the source statistics). The source
memory is always built with source statistics.

Source training. The authors do not run the memory over features of a cross-entropy network: their
source model is trained with the kNN vote itself as the loss against a queue of recent training
features (yfzhang114/AdaNPC ``domainbed/algorithms.py`` class ``KNN``; here ``tta train-source
--objective knn``, `tta.models.knn_objective`, the card ``resnet20-fmnist-knn``). The vote of such
a card over its source memory without adaptation (``extend_memory=False``) is its source model.

AdaNPC-BN (``feature_bn=True``; reference ``domainbed/adapt_algorithms.py`` class ``AdaNPCBN``): a
fresh BatchNorm1d (weight 1, bias 0, batch statistics) normalises the test features before the
vote, and is trained by entropy minimisation of the vote: ``bn_steps`` = 3 Adam steps per batch at
``bn_lr`` = 1e-5 (the reference: 0.01 x its training lr, 1e-3 Adam for small images; no weight
decay), vote temperature 0.01. The returned prediction is the last step's vote (before its
update); the memory receives the normalised BN features of that step with the vote's argmax.
Differences from the reference code, all deliberate:

- the reference appends the batch at every one of its 3 steps (each image enters the memory three
  times, and steps 2-3 vote against the image's own copy from the step before, sim ~ 1 at tau
  0.01, which mostly echoes step 1's label); here the batch is appended once, after the steps;
- the loss is the entropy of the vote distribution; the reference takes the entropy of
  softmax(scores), treating probabilities in [0, 1] as logits (nearly flat, tiny gradients):
  ``softmax_entropy=True`` reproduces it;
- a one-image batch is voted with the feature BN's running statistics and not adapted on (the
  reference cannot normalise it).

Which card and which variant (measured on ``fmnist-c-continual``, 2,000 images per domain, error %;
BENCHMARKS.md "AdaNPC on a kNN-trained and a cross-entropy card" has the per-domain tables):

- ``norm="bn"`` is the choice that matters. Over frozen source features the corrupted features land
  in other classes' neighbourhoods (snow to contrast: 11-18% of the 100 nearest source rows carry the
  true class) and nothing here undoes it: the kNN card's own vote makes 48.15, AdaNPC 48.53,
  AdaNPC-BN 49.11 (cross-entropy card: 48.24 / 48.42 / 40.42), against 22-26 with the network's
  BatchNorm adapted. The vote over the BN-adapted network's features (``norm="bn"``) on the kNN card
  makes 24.46, below BN with the card's linear-probe head (26.26) on 14 of 15 domains.
- The memory extension itself does not improve on its baseline (the same vote,
  ``extend_memory=False``) beyond noise in any setting measured: kNN card 48.53 vs 48.15 frozen,
  24.41 vs 24.46 with ``norm="bn"`` (15 images of 30,000); cross-entropy card 48.42 vs 48.24 and
  22.82 vs 22.53. With beta 0.1 every test feature is appended (a vote's largest score is >= 1/C),
  so on a domain whose vote is mostly wrong most new rows carry wrong labels, and the next batches
  of that corruption vote mostly against them (gaussian noise 55.25 -> 58.35 on the kNN card, 57.60
  -> 68.65 on the cross-entropy card); where the vote is mostly right the new rows agree with the
  source rows and change little. ``extend_memory=False`` gives the same or a lower error here, at a
  constant memory size.
- The kNN-trained card does not pay here: its features are no more robust than the cross-entropy
  card's (vote 48.15 vs the CE card's source 46.91), and every BN-family row is worse on it (BN 26.26
  vs 22.46, TENT 27.03 vs 20.52). For the lowest error use the cross-entropy card with TENT or BN.
  Pick AdaNPC for a gradient-free classifier whose memory can be inspected, bounded and extended
  with labelled rows: then ``norm="bn"`` on the kNN-trained card (about 2 points above BN and 4
  above TENT on the cross-entropy card).
- ``feature_bn`` (AdaNPC-BN) standardises the test features per dimension with batch statistics
  while the memory rows are source features that are not (pooled after a ReLU, every coordinate
  >= 0; centred queries no longer point where those rows do): it gains where a corruption
  collapses the features (fog 89.25 -> 77.80, impulse noise 76.55 -> 49.75 on the kNN card) and loses
  where the source vote was already right (shot noise 16.35 -> 33.90, JPEG 15.15 -> 31.30). Over BN
  features it is worse than AdaNPC on every domain (27.65 vs 24.41 on the kNN card). It is kept for
  fidelity to the reference, not as a recommendation.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from tta import ops
from tta.adapters.base import Adapter
from tta.adapters.config import AdapterConfig
from tta.adapters.registry import register_adapter
from tta.errors import ConfigError, DataNotFoundError, InvalidInputError, NoAdaptableLayerError, StateMismatchError
from tta.layers import has_batchnorm, replace_batchnorms, source_statistics
from tta.models.artifacts import read_artifact, write_artifact

MEMORY_FORMAT = "tta-adanpc-memory/1"
MEMORY_SUFFIX = ".memory.safetensors"


@dataclass
class AdaNPCConfig(AdapterConfig):
    """k, temperature (tau), beta: the paper's defaults 100, 0.1, 0.1.

    temperature: vote temperature; None: 0.1, or 0.01 with ``feature_bn`` (the reference's values).
    extend_memory: append confident test features (False: the vote over the source memory alone,
        nothing adapts: the "source" classifier of a kNN-trained card).
    feature_bn: AdaNPC-BN (see module doc): a BatchNorm1d on the features, trained by entropy
        minimisation of the vote, ``bn_steps`` Adam steps per batch at learning rate ``bn_lr``.
    bn_steps, bn_lr: 3 and 1e-5 (the reference: 3 steps, 0.01 x its small-image training lr 1e-3).
    softmax_entropy: reproduce the reference's BN loss, the entropy of softmax(scores) (default:
        the entropy of the vote itself).

    memory: path of a memory file (``tta build-memory``) or a model card (name or YAML path) whose
        ``<card>.memory.safetensors`` is used (`ModelCard.artifact_path`); None: call
        `set_source_memory` before use.
    capacity: total rows (source + test) kept; None grows without bound (the reference).
    class_balanced: evict from the class with most test entries (oldest first) instead of FIFO.
    storage_dtype: "float32" or "float16" rows.
    norm / source_weight: normalisation of the feature extractor ("source", "bn", "alpha-bn").
    feature_layer: classifier module whose input is the feature (None: timm/built-in pre-logits,
        else the input of the last nn.Linear).
    softmax_confidence: reproduce the reference's softmax-of-scores confidence.
    """

    k: int = 100
    temperature: float | None = None
    beta: float = 0.1
    extend_memory: bool = True
    feature_bn: bool = False
    bn_steps: int = 3
    bn_lr: float = 1e-5
    softmax_entropy: bool = False
    memory: str | None = None
    capacity: int | None = None
    class_balanced: bool = False
    storage_dtype: Literal["float32", "float16"] = "float32"
    norm: Literal["source", "bn", "alpha-bn"] = "source"
    source_weight: float = 0.9
    feature_layer: str | None = None
    softmax_confidence: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.k <= ops.KNN_MAX_K:
            raise ConfigError(f"k must be in [1, {ops.KNN_MAX_K}], got {self.k}")
        if self.temperature is None:
            self.temperature = 0.01 if self.feature_bn else 0.1
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.bn_steps < 1:
            raise ConfigError(f"bn_steps must be >= 1, got {self.bn_steps}")
        if not self.bn_lr > 0:
            raise ConfigError(f"bn_lr must be > 0, got {self.bn_lr}")
        if self.capacity is not None and self.capacity < 1:
            raise ConfigError(f"capacity must be >= 1 or None, got {self.capacity}")
        if self.storage_dtype not in ("float32", "float16"):
            raise ConfigError(f"storage_dtype must be 'float32' or 'float16', got {self.storage_dtype!r}")
        if self.norm not in ("source", "bn", "alpha-bn"):
            raise ConfigError(f"norm must be 'source', 'bn' or 'alpha-bn', got {self.norm!r}")
        if not 0.0 <= self.source_weight <= 1.0:
            raise ConfigError(f"source_weight must be in [0, 1], got {self.source_weight}")


class KnnMemory:
    """Rows of (L2-normalised feature, label): a pinned source part, then the test part.

    Rows live in one preallocated tensor ([source | test], the test part contiguous after the
    source part), so the kNN op reads ``features[:size]`` without copying. ``stamps`` orders the
    test entries by insertion for FIFO eviction.
    """

    def __init__(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        capacity: int | None = None,
        class_balanced: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        validate_memory(features, labels, num_classes)
        n = features.shape[0]
        if capacity is not None and capacity <= n:
            raise ConfigError(
                f"AdaNPC capacity {capacity} leaves no room for test entries beside {n} source rows; "
                f"use capacity > {n} (or a smaller source memory: tta build-memory --limit)"
            )
        self.num_classes = int(num_classes)
        self.capacity = capacity
        self.class_balanced = class_balanced
        self.num_source = n
        rows = capacity if capacity is not None else max(2 * n, 1024)
        self.features = features.new_zeros((rows, features.shape[1]), dtype=dtype)
        self.features[:n] = F.normalize(features.float(), dim=1).to(dtype)
        self.labels = labels.new_full((rows,), -1)
        self.labels[:n] = labels
        self.stamps = torch.full((rows,), -1, dtype=torch.int64, device=labels.device)
        self.size = n
        self.next_stamp = 0

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    @property
    def num_test(self) -> int:
        return self.size - self.num_source

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (size, D), labels (size,)) views of the occupied rows."""
        return self.features[: self.size], self.labels[: self.size]

    def to(self, device: torch.device) -> "KnnMemory":
        self.features = self.features.to(device)
        self.labels = self.labels.to(device)
        self.stamps = self.stamps.to(device)
        return self

    def truncate(self) -> None:
        """Drop every test entry (the source part stays)."""
        self.size = self.num_source
        self.next_stamp = 0

    def add(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Append L2-normalised `features` with `labels`, evicting test entries when full."""
        n = features.shape[0]
        if n == 0:
            return
        stamps = torch.arange(self.next_stamp, self.next_stamp + n, device=labels.device)
        self.next_stamp += n
        if self.capacity is None:
            self._grow(self.size + n)
        room = self.features.shape[0] - self.size
        if n <= room:
            self._write(torch.arange(self.size, self.size + n, device=labels.device), features, labels, stamps)
            self.size += n
            return
        self._evict_and_write(features, labels, stamps)

    def _write(self, slots: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, stamps: torch.Tensor) -> None:
        self.features[slots] = features.to(self.features.dtype)
        self.labels[slots] = labels
        self.stamps[slots] = stamps

    def _grow(self, rows: int) -> None:
        if rows <= self.features.shape[0]:
            return
        new_rows = max(rows, 2 * self.features.shape[0])
        grow = new_rows - self.features.shape[0]
        self.features = torch.cat([self.features, self.features.new_zeros((grow, self.dim))])
        self.labels = torch.cat([self.labels, self.labels.new_full((grow,), -1)])
        self.stamps = torch.cat([self.stamps, self.stamps.new_full((grow,), -1)])

    def _evict_and_write(self, features: torch.Tensor, labels: torch.Tensor, stamps: torch.Tensor) -> None:
        """Full memory: choose which test entries (old and new) survive, write the new ones."""
        s, test_cap = self.num_source, self.features.shape[0] - self.num_source
        old = self.size - s
        pool_labels = torch.cat([self.labels[s : self.size], labels])
        pool_stamps = torch.cat([self.stamps[s : self.size], stamps])
        if self.class_balanced:
            keep = _class_balanced_keep(pool_labels, pool_stamps, test_cap, self.num_classes)
        else:
            keep = torch.zeros_like(pool_labels, dtype=torch.bool)
            keep[pool_stamps.topk(test_cap).indices] = True  # the newest test_cap entries
        keep_old, keep_new = keep[:old], keep[old:]
        # slots: the evicted old entries, then the free rows after the occupied part
        free = torch.cat([
            (~keep_old).nonzero().squeeze(1) + s,
            torch.arange(self.size, s + test_cap, device=labels.device),
        ])
        n_new = int(keep_new.sum())
        self._write(free[:n_new], features[keep_new], labels[keep_new], stamps[keep_new])
        self.size = s + test_cap
        # Evicted slots not refilled would be holes: only possible if fewer new entries survive than
        # old ones were evicted, which the keep rules exclude (they always keep test_cap entries).
        assert int(keep_old.sum()) + n_new == test_cap

    def state(self) -> dict[str, Any]:
        return {
            "features": self.features[: self.size].clone(),
            "labels": self.labels[: self.size].clone(),
            "stamps": self.stamps[: self.size].clone(),
            "num_source": self.num_source,
            "next_stamp": self.next_stamp,
            "num_classes": self.num_classes,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        feats, labels, stamps = state["features"], state["labels"], state["stamps"]
        size, num_source = feats.shape[0], int(state["num_source"])
        if feats.dim() != 2 or feats.shape[1] != self.dim or labels.shape != (size,) or stamps.shape != (size,):
            raise InvalidInputError(f"AdaNPC memory state has shapes {tuple(feats.shape)}/{tuple(labels.shape)}; "
                                    f"expected (n, {self.dim}) rows with n labels")
        if self.capacity is not None and size > self.capacity:
            raise InvalidInputError(f"AdaNPC memory state holds {size} rows, over the capacity {self.capacity}")
        rows = self.capacity if self.capacity is not None else max(2 * size, 1024)
        device = self.features.device
        self.features = self.features.new_zeros((rows, self.dim))
        self.features[:size] = feats.to(device, self.features.dtype)
        self.labels = torch.full((rows,), -1, dtype=torch.int64, device=device)
        self.labels[:size] = labels.to(device)
        self.stamps = torch.full((rows,), -1, dtype=torch.int64, device=device)
        self.stamps[:size] = stamps.to(device)
        self.size, self.num_source = size, num_source
        self.next_stamp = int(state["next_stamp"])


def check_memory_state(state: Any, memory: KnnMemory | None, capacity: int | None) -> None:
    """Validate a saved memory (`KnnMemory.state()`) before it replaces `memory`; raise InvalidInputError."""
    keys = ("features", "labels", "stamps", "num_source", "next_stamp", "num_classes")
    if not isinstance(state, Mapping) or any(k not in state for k in keys):
        raise InvalidInputError(f"the AdaNPC memory entry must hold {', '.join(keys)}")
    feats, labels, stamps = state["features"], state["labels"], state["stamps"]
    if not all(isinstance(t, torch.Tensor) for t in (feats, labels, stamps)):
        raise InvalidInputError("the AdaNPC memory's features, labels and stamps must be tensors")
    counts = [state[k] for k in ("num_source", "next_stamp", "num_classes")]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts):
        raise InvalidInputError(f"the AdaNPC memory's num_source/next_stamp/num_classes must be integers >= 0, got {counts}")
    num_source, _, num_classes = counts
    validate_memory(feats, labels, num_classes)
    size = feats.shape[0]
    if stamps.shape != (size,) or stamps.dtype != torch.int64 or not 1 <= num_source <= size:
        raise InvalidInputError(f"the AdaNPC memory holds {size} rows but {tuple(stamps.shape)} stamps and "
                                f"{num_source} source rows")
    if memory is not None and (feats.shape[1] != memory.dim or num_classes != memory.num_classes):
        raise InvalidInputError(f"the AdaNPC memory has {feats.shape[1]}-dim rows over {num_classes} classes; this "
                                f"adapter's has {memory.dim}-dim rows over {memory.num_classes}")
    if capacity is not None and size > capacity:
        raise InvalidInputError(f"the AdaNPC memory holds {size} rows, over the capacity {capacity}")


def _class_balanced_keep(labels: torch.Tensor, stamps: torch.Tensor, budget: int, num_classes: int) -> torch.Tensor:
    """Keep `budget` entries: classes are cut from the largest down (water-filling), each class
    keeping its newest entries. Equivalent to evicting, one at a time, the oldest entry of the
    currently largest class."""
    counts = torch.bincount(labels, minlength=num_classes)
    lo, hi = 0, int(counts.max())
    while lo < hi:  # largest level L with sum(min(count, L)) <= budget (log2(max count) steps)
        mid = (lo + hi + 1) // 2
        if int(counts.clamp(max=mid).sum()) <= budget:
            lo = mid
        else:
            hi = mid - 1
    quota = counts.clamp(max=lo)
    extra = budget - int(quota.sum())
    if extra > 0:  # the remainder: one more row for the largest classes still above the level
        above = (counts > quota).nonzero().squeeze(1)
        order = counts[above].argsort(descending=True, stable=True)
        quota[above[order[:extra]]] += 1
    # rank of each entry inside its class, newest first
    order = torch.argsort(stamps, descending=True)
    lab_sorted = labels[order]
    by_class = torch.argsort(lab_sorted, stable=True)
    ranked = order[by_class]
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(labels.numel(), device=labels.device) - first[labels[ranked]]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[ranked] = rank < quota[labels[ranked]]
    return keep


def validate_memory(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    if features.dim() != 2 or not features.is_floating_point():
        raise InvalidInputError(f"AdaNPC memory features must be a float (N, D) tensor, got {features.dtype} "
                                f"{tuple(features.shape)}")
    if labels.shape != (features.shape[0],) or labels.dtype != torch.int64:
        raise InvalidInputError(f"AdaNPC memory labels must be int64 of shape ({features.shape[0]},), got "
                                f"{labels.dtype} {tuple(labels.shape)}")
    if features.shape[0] == 0:
        raise InvalidInputError("AdaNPC memory is empty: the source part needs at least one row")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise InvalidInputError(f"AdaNPC memory labels must lie in [0, {num_classes})")
    if not bool(torch.isfinite(features).all()):
        raise InvalidInputError("AdaNPC memory features contain NaN/Inf")


# ---------------------------------------------------------------------- memory files
def memory_path_for_card(card: str) -> Path:
    """The memory file ``<card>.memory.safetensors`` of a card (name or YAML path), found by
    `ModelCard.artifact_path`; where it would be written when there is none yet."""
    from tta.models import get_card

    mc = get_card(card)
    return mc.artifact_path(MEMORY_SUFFIX) or mc.artifact_output_path(MEMORY_SUFFIX)


def save_memory(path: str | os.PathLike[str], features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                metadata: dict[str, str] | None = None) -> Path:
    """Write a source memory (normalised rows, labels) as safetensors with its metadata, atomically."""
    validate_memory(features, labels, num_classes)
    meta = {"num_classes": num_classes, "feature_dim": features.shape[1], "normalized": "l2", **(metadata or {})}
    return write_artifact(path, {"features": F.normalize(features.float(), dim=1).to(features.dtype),
                                 "labels": labels}, MEMORY_FORMAT, meta)


def load_memory(path: str | os.PathLike[str]) -> tuple[torch.Tensor, torch.Tensor, int, dict[str, str]]:
    """(features, labels, num_classes, metadata) of a memory file, validated."""
    tensors, meta = read_artifact(path, MEMORY_FORMAT, "AdaNPC memory", "tta build-memory --model CARD")
    if set(tensors) != {"features", "labels"} or not meta.get("num_classes", "").isdigit():
        raise DataNotFoundError(f"{path}: an AdaNPC memory file holds 'features' and 'labels' and its num_classes, "
                                f"got {sorted(tensors)}, num_classes {meta.get('num_classes')!r}")
    features, labels = tensors["features"], tensors["labels"]
    num_classes = int(meta["num_classes"])
    validate_memory(features, labels, num_classes)
    return features, labels, num_classes, meta


@torch.no_grad()
def build_source_memory(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500,
                        feature_layer: str | None = None, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised pooled features of source images (uint8 or [0, 1] float NCHW) + their labels.

    The model runs in eval mode (source BatchNorm statistics).
    """
    from tta.models.features import extract_features

    model.eval()
    feats = []
    for i in range(0, images.shape[0], batch_size):
        x = images[i : i + batch_size].to(device)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        feats.append(F.normalize(extract_features(model, x, feature_layer).float(), dim=1).to(dtype).cpu())
    return torch.cat(feats), labels.to(torch.int64).cpu()


# ---------------------------------------------------------------------- the adapter
@register_adapter("adanpc")
class AdaNPC(Adapter[AdaNPCConfig]):
    """AdaNPC: kNN vote over a source+test feature memory; returns probabilities (see module doc)."""

    Config = AdaNPCConfig
    output_kind = "probs"

    def __init__(self, model: nn.Module, config: AdaNPCConfig | None = None) -> None:
        cfg = config if config is not None else AdaNPCConfig()
        # instance-level: depends on the config (the feature BN needs > 1 sample, like BN layers)
        self.uses_batch_stats = cfg.norm != "source" or cfg.feature_bn
        self.memory: KnnMemory | None = None
        super().__init__(model, cfg)
        if cfg.memory is not None:
            path = Path(cfg.memory)
            if path.suffix in (".yaml", ".yml") or (not path.is_file() and not path.name.endswith(".safetensors")):
                path = memory_path_for_card(cfg.memory)  # a model card, by name or path
            features, labels, num_classes, _ = load_memory(path)
            self.set_source_memory(features, labels, num_classes)

    def configure_model(self) -> None:
        cfg = self.config
        self.model.eval()
        self.model.requires_grad_(False)
        if cfg.norm != "source":
            if not has_batchnorm(self.model):
                raise NoAdaptableLayerError(f"adanpc: norm={cfg.norm!r} needs BatchNorm layers in the model")
            replace_batchnorms(self.model, cfg.source_weight if cfg.norm == "alpha-bn" else 0.0)
        # AdaNPC-BN: a fresh BatchNorm1d (weight 1, bias 0) on the features, in train mode (batch statistics)
        self.feature_bn = (nn.BatchNorm1d(feature_dim(self.model, cfg.feature_layer)).to(self.device)
                           if cfg.feature_bn else None)

    def collect_params(self) -> list[nn.Parameter]:
        return list(self.feature_bn.parameters()) if self.feature_bn is not None else []

    def build_optimizer(self, params: list[Any]) -> torch.optim.Optimizer:
        cfg = self.config
        return torch.optim.Adam(params, lr=cfg.bn_lr, weight_decay=0.0)  # the reference: Adam, no decay (small images)

    def set_source_memory(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
        """Install the source part of the memory (rows are L2-normalised here); drops test entries."""
        cfg = self.config
        dtype = torch.float16 if cfg.storage_dtype == "float16" else torch.float32
        with torch.inference_mode(False):  # the memory grows in place: no inference tensors
            self.memory = KnnMemory(features.to(self.device), labels.to(self.device), num_classes, cfg.capacity,
                                    cfg.class_balanced, dtype)

    def _require_memory(self) -> KnnMemory:
        if self.memory is None:
            raise ConfigError(
                "adanpc has no source memory: pass memory=PATH_OR_CARD (build it with `tta build-memory "
                "--model CARD`) or call adapter.set_source_memory(features, labels, num_classes)"
            )
        if self.memory.features.device != self.device:
            self.memory.to(self.device)
        return self.memory

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (N, D) of the frozen model, checked against the memory's row width."""
        from tta.models.features import extract_features

        cfg = self.config
        memory = self._require_memory()
        feats = extract_features(self.model, x, cfg.feature_layer).float()
        if feats.shape[1] != memory.dim:
            raise InvalidInputError(
                f"adanpc: the model's features have {feats.shape[1]} dims but the memory rows have {memory.dim}; "
                "rebuild the memory for this model"
            )
        return feats

    def _vote(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L2-normalised query rows, class scores) of the vote over the memory."""
        cfg = self.config
        memory = self._require_memory()
        queries = F.normalize(feats, dim=1)
        rows, labels = memory.rows()
        return queries, ops.knn_vote(queries, rows, labels, memory.num_classes, cfg.k, cfg.temperature, metric="ip")

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        with torch.no_grad():
            feats = self._features(x)
        if self.feature_bn is None:
            with torch.no_grad():
                queries, probs = self._vote(feats)
        else:
            queries, probs = self._adapt_feature_bn(feats)
        if cfg.extend_memory:
            confidence, pseudo = probs.max(dim=1)
            if cfg.softmax_confidence:
                confidence = probs.softmax(dim=1).max(dim=1).values
            keep = confidence >= cfg.beta
            self._require_memory().add(queries[keep], pseudo[keep])
        return probs

    def _adapt_feature_bn(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """AdaNPC-BN: `bn_steps` entropy-minimisation steps of the feature BN on this batch's vote.

        Returns the queries and vote of the last step (computed before its update), detached.
        """
        cfg = self.config
        assert self.feature_bn is not None
        self.feature_bn.train()  # batch statistics, whatever mode the adapter module was put in
        with torch.enable_grad():
            for _ in range(cfg.bn_steps):
                queries, probs = self._vote(self.feature_bn(feats))
                if cfg.softmax_entropy:  # the reference: scores treated as logits
                    entropy = -(probs.softmax(1) * probs.log_softmax(1)).sum(1)
                else:
                    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1)
                self.apply_loss(entropy.mean())
        return queries.detach(), probs.detach()

    @torch.no_grad()
    def predict_without_adapting(self, x: torch.Tensor) -> torch.Tensor:
        """The vote with source BatchNorm statistics and the feature BN's running statistics."""
        with source_statistics(self.model):
            feats = self._features(x)
        bn = self.feature_bn
        if bn is not None:
            feats = F.batch_norm(feats, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return self._vote(feats)[1]

    @torch.no_grad()
    def predict_current(self, x: torch.Tensor) -> torch.Tensor:
        """The vote of the current memory, nothing added to it (real-time protocol's skipped batches)."""
        return self._vote(x)[1]

    def reset(self) -> None:
        super().reset()
        if self.memory is not None:
            self.memory.truncate()
        if self.feature_bn is not None:
            self.feature_bn.reset_parameters()  # weight 1, bias 0, running statistics 0 / 1

    def _after_move(self) -> None:
        super()._after_move()
        if self.memory is not None:
            self.memory.to(self.device)

    def get_extra_state(self) -> dict[str, Any]:
        state = super().get_extra_state()
        state["memory"] = self.memory.state() if self.memory is not None else None
        return state

    def check_extra_state(self, extra: Mapping[str, Any], where: str) -> None:
        super().check_extra_state(extra, where)
        mem = extra.get("memory")
        if mem is None:
            return
        try:
            check_memory_state(mem, self.memory, self.config.capacity)
        except InvalidInputError as exc:
            raise StateMismatchError(f"{where}: {exc}") from None

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        mem = state.get("memory")
        if mem is None:
            return
        if self.memory is None:
            n = int(mem["num_source"])
            self.set_source_memory(mem["features"][:n].float(), mem["labels"][:n], int(mem["num_classes"]))
        assert self.memory is not None
        self.memory.load_state(mem)


def feature_dim(model: nn.Module, layer: str | None = None) -> int:
    """Width of the pooled features: the input width of the classifier `nn.Linear` (`layer`, else the last one)."""
    from tta.models.features import AUTO_LAYERS, classifier_name
    from tta.models.normalize import Normalized

    net = model.model if isinstance(model, Normalized) else model
    name = layer if layer is not None and layer not in AUTO_LAYERS else classifier_name(net)
    head = net.get_submodule(name)
    if not isinstance(head, nn.Linear):
        raise NoAdaptableLayerError(f"adanpc feature_bn: {name!r} is a {type(head).__name__}, not an nn.Linear "
                                    "whose input width sizes the feature BatchNorm")
    return head.in_features
