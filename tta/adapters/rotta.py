"""RoTTA: robust test-time adaptation in dynamic scenarios (Yuan, Xie, Li; CVPR 2023).

Three parts, each readable against the paper (section 3) and the authors' code (BIT-DA/RoTTA; also
ported to the reference CTTA library, mariodoebler/test-time-adaptation):

1. **Robust batch normalisation** (`RobustBatchNorm`): every BatchNorm keeps *global* statistics,
   initialised with the source running statistics. In train mode a batch updates them first,
   mu <- (1 - a) mu + a mu_batch, var <- (1 - a) var + a var_batch (biased batch variance,
   a = ``bn_momentum`` 0.05), and is normalised with the updated values (the gradient flows through
   the batch's share); in eval mode (prediction) the layer normalises with the global statistics
   and changes nothing.
2. **Category-balanced sampling with timeliness and uncertainty** (`CategoryBalancedMemory`, the
   paper's CSTU): a memory bank of ``memory_size`` = 64 test images, each stored with the teacher's
   pseudo-label, its uncertainty (entropy of the teacher's softmax) and its age (samples seen since it
   was stored). Its score is ``lambda_t / (1 + exp(-age / capacity)) + lambda_u * entropy / ln C``.
   A new sample of predicted class c (score with age 0) is admitted when class c holds fewer than
   capacity / C items and the bank is not full; if c is under its share but the bank is full, the
   highest-scoring item of the most occupied classes is evicted if it scores higher than the new
   one; if c is at or over its share, the highest-scoring item of class c itself, likewise. A
   rejected sample is dropped; after every sample all stored ages grow by one.
3. **Time-aware reweighting and the teacher-student update**: every ``update_frequency`` = 64 samples
   the student (trained: the affine parameters of the robust BNs, and of LayerNorm/GroupNorm) is
   updated on the memory bank: loss = mean over the bank of w(age) * CE(teacher(m) -> student(aug(m))),
   with w(a) = exp(-a') / (1 + exp(-a')), a' = age / capacity, and aug the CoTTA augmentation (one
   draw for the whole bank); then the teacher follows by EMA with nu = 0.001
   (``ema_momentum`` = 1 - nu = 0.999). Student and teacher run in train mode for the update (their
   robust BNs move their global statistics: the teacher's on the clean bank, the student's on the
   augmented one) and in eval mode for prediction; the prediction is the teacher's, computed before
   the batch's samples enter the bank.

The per-sample bookkeeping of part 2 is sequential by definition (each admission depends on the
bank the previous one left): it runs as a host loop over the batch's (label, entropy) pairs with
vectorised score arithmetic over the 64 slots (ages are kept as insertion times, so nothing is
updated per slot and sample; ~50 us per sample on the 2-core box), while the images are copied
into the bank's device tensor once per update (one ``index_copy_``), and the labels and entropies
come to the host in one transfer per batch. The update runs at the same points of the
stream as the reference's (samples 64, 128, ...), several times within a batch of 200.

Defaults and presets: the authors' configuration (``configs/adapter/rotta.yaml``: Adam lr 1e-3,
beta 0.9, memory 64, update every 64 samples, nu 0.001, alpha 0.05, lambda_t = lambda_u = 1), used by
the reference library for cifar10, cifar100 and imagenet alike.

Deviations, documented:
- LayerNorm / GroupNorm affine parameters are trained too (as in the reference library's port; the
  authors' code trains robust-BN parameters only). On a model without BatchNorm (the ViT card) there
  is nothing for robust BN to replace: RoTTA there is the memory bank + timeliness-weighted
  teacher-student update of the LayerNorm parameters.
- The EMA covers the trained parameters; the reference averages every parameter, but frozen ones
  are equal in student and teacher (here the teacher shares them with the student).
- Dropout masks of the train-mode update come from the adapter's seed (`train_mode_rng`).
- The memory bank stores each image as given (after the batch's checks); its age scores use numpy's
  exp (the reference: Python's math.exp, at most one ulp apart).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from tta.adapters.entropy import NORM_TYPES
from tta.adapters.registry import register_adapter
from tta.adapters.teacher import TeacherConfig, TeacherStudentAdapter, soft_cross_entropy_per_sample
from tta.errors import ConfigError, InvalidInputError, NoAdaptableLayerError, StateMismatchError
from tta.layers import CalibratedBatchNorm


@dataclass
class RottaConfig(TeacherConfig):
    """RoTTA options; defaults: the authors' configuration (see the module docstring).

    ema_momentum: teacher EMA momentum m = 1 - nu (0.999; the paper's nu = 0.001).
    memory_size: capacity of the category-balanced memory bank (64).
    update_frequency: samples between two updates of the student (64).
    bn_momentum: robust BN's weight of a batch's statistics, alpha (0.05).
    lambda_t / lambda_u: weights of timeliness and uncertainty in the memory score (1.0 / 1.0).
    """

    memory_size: int = 64
    update_frequency: int = 64
    bn_momentum: float = 0.05
    lambda_t: float = 1.0
    lambda_u: float = 1.0

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "cifar10": {"optimizer": "adam", "lr": 1e-3, "betas": (0.9, 0.999)},
        "cifar100": {"optimizer": "adam", "lr": 1e-3, "betas": (0.9, 0.999)},
        "imagenet": {"optimizer": "adam", "lr": 1e-3, "betas": (0.9, 0.999)},
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.memory_size < 1 or self.update_frequency < 1:
            raise ConfigError(f"memory_size and update_frequency must be >= 1, got {self.memory_size}, "
                              f"{self.update_frequency}")
        if not 0.0 <= self.bn_momentum <= 1.0:
            raise ConfigError(f"bn_momentum must be in [0, 1], got {self.bn_momentum}")
        if self.lambda_t < 0 or self.lambda_u < 0:
            raise ConfigError(f"lambda_t and lambda_u must be >= 0, got {self.lambda_t}, {self.lambda_u}")


# ---------------------------------------------------------------------- robust batch normalisation
class RobustBatchNorm(nn.Module):
    """RoTTA's robust BN (see the module docstring); a drop-in for `nn.BatchNorm{1,2,3}d` with the
    same parameter and buffer names (``running_mean`` / ``running_var`` hold the global statistics)."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, momentum: float) -> None:
        super().__init__()
        if bn.running_mean is None or bn.running_var is None:
            raise NoAdaptableLayerError(
                f"rotta: {type(bn).__name__} has no running statistics (track_running_stats=False) to start "
                "robust BN's global statistics from"
            )
        self.num_features = bn.num_features
        self.eps = bn.eps
        self.momentum = float(momentum)
        if bn.affine:
            self.weight = nn.Parameter(bn.weight.detach().clone())
            self.bias = nn.Parameter(bn.bias.detach().clone())
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", bn.running_mean.detach().clone().float())
        self.register_buffer("running_var", bn.running_var.detach().clone().float())
        # timm's BatchNormAct2d applies dropout and an activation after normalising
        self.post = nn.Sequential(bn.drop, bn.act) if hasattr(bn, "act") and hasattr(bn, "drop") else nn.Identity()

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"

    def as_batchnorm(self) -> CalibratedBatchNorm:
        """This layer as a plain BatchNorm (`CalibratedBatchNorm`: its affine parameters, its global
        statistics as the running ones, the same post-normalisation ops): what the collapse guard's
        stateless reference is built from (`tta.engine.guard.reference_model`)."""
        post = None if isinstance(self.post, nn.Identity) else self.post
        layer = CalibratedBatchNorm(self.num_features, self.eps, self.weight is not None, 1.0, post)
        layer.to(self.running_mean.device)
        with torch.no_grad():
            if self.weight is not None:
                layer.weight.copy_(self.weight)
                layer.bias.copy_(self.bias)
            layer.running_mean.copy_(self.running_mean)
            layer.running_var.copy_(self.running_var)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1, -1] + [1] * (x.dim() - 2)
        if self.training:
            dims = [0] + list(range(2, x.dim()))
            var, mean = torch.var_mean(x, dim=dims, unbiased=False)
            a = self.momentum
            mean = (1 - a) * self.running_mean + a * mean
            var = (1 - a) * self.running_var + a * var
            with torch.no_grad():
                self.running_mean.copy_(mean)
                self.running_var.copy_(var)
        else:
            mean, var = self.running_mean, self.running_var
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.weight is not None:
            scale = scale * self.weight
            shift = shift * self.weight + self.bias
        return self.post(torch.addcmul(shift.view(shape), x, scale.view(shape)))


def replace_with_robust_bn(model: nn.Module, momentum: float) -> list[RobustBatchNorm]:
    """Swap every `_BatchNorm` of `model` (in place) for a `RobustBatchNorm`; return them."""
    replaced: list[RobustBatchNorm] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                layer = RobustBatchNorm(child, momentum).to(child.running_mean.device)
                setattr(parent, name, layer)
                replaced.append(layer)
    return replaced


# ---------------------------------------------------------------------- the memory bank
class CategoryBalancedMemory:
    """The paper's category-balanced sampling with timeliness and uncertainty (CSTU), as fixed slots.

    Host arrays per slot: ``used``, ``label``, ``entropy`` and ``inserted`` (the sample count when it
    was stored). Every stored item ages by one per offered sample, so an item's age is
    ``clock - inserted`` (`ages`), with ``clock`` the number of samples offered: nothing is updated
    per slot and sample. Ordered by (label, inserted), the slots give the reference's class-then-
    arrival order of the bank. The images live in ``data`` ((capacity, C, H, W), on the model's
    device, allocated with the first image).
    """

    def __init__(self, capacity: int, num_classes: int, lambda_t: float = 1.0, lambda_u: float = 1.0) -> None:
        if num_classes < 2:
            raise ConfigError(f"rotta: the memory bank needs >= 2 classes, got {num_classes}")
        self.capacity = capacity
        self.num_classes = num_classes
        self.per_class = capacity / num_classes
        self.lambda_t = lambda_t
        self.lambda_u = lambda_u
        self.used = np.zeros(capacity, dtype=bool)
        self.label = np.zeros(capacity, dtype=np.int64)
        self.entropy = np.zeros(capacity, dtype=np.float64)
        self.inserted = np.zeros(capacity, dtype=np.int64)
        self.counts = np.zeros(num_classes, dtype=np.int64)  # stored items per class
        self.clock = 0
        self.data: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.counts.sum())

    def ages(self) -> np.ndarray:
        """Age of every slot (meaningful where ``used``): samples offered since it was stored."""
        return self.clock - self.inserted

    def score(self, age: np.ndarray | float, entropy: np.ndarray | float) -> np.ndarray:
        """lambda_t * sigmoid(age / capacity) + lambda_u * entropy / ln C, in the reference's order."""
        return (self.lambda_t * 1 / (1 + np.exp(-np.asarray(age) / self.capacity))
                + self.lambda_u * np.asarray(entropy) / math.log(self.num_classes))

    def add(self, label: int, entropy: float) -> int | None:
        """Offer one sample (its pseudo-label and entropy): the slot it is stored in, or None when it
        is rejected. Every stored item ages by one either way."""
        slot = self._admit(label, float(self.score(0, entropy)))
        if slot is not None:
            self.used[slot] = True
            self.label[slot] = label
            self.entropy[slot] = entropy
            self.inserted[slot] = self.clock
            self.counts[label] += 1
        self.clock += 1
        return slot

    def _admit(self, label: int, new_score: float) -> int | None:
        counts = self.counts
        if counts[label] < self.per_class:
            if counts.sum() < self.capacity:
                return int(np.argmin(self.used))  # the first free slot
            candidates = self.used & (counts[self.label] == counts.max())  # the most occupied classes
        else:
            candidates = self.used & (self.label == label)
        idx = np.flatnonzero(candidates)
        scores = self.score(self.clock - self.inserted[idx], self.entropy[idx])
        best = scores.max()
        if not best > new_score:
            return None
        ties = idx[scores == best]
        # The reference walks classes in order, items in arrival order, keeping the last maximum.
        victim = int(ties[0] if ties.size == 1 else ties[np.lexsort((self.inserted[ties], self.label[ties]))[-1]])
        self.used[victim] = False
        counts[self.label[victim]] -= 1
        return victim

    def order(self) -> np.ndarray:
        """Slots of the stored items in the reference's order (by class, then arrival)."""
        idx = np.flatnonzero(self.used)
        return idx[np.lexsort((self.inserted[idx], self.label[idx]))]

    def clear(self) -> None:
        self.used[:] = False
        self.counts[:] = 0
        self.clock = 0

    # -- state
    def state(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes, "clock": self.clock,
            "used": torch.from_numpy(self.used.copy()), "label": torch.from_numpy(self.label.copy()),
            "entropy": torch.from_numpy(self.entropy.copy()), "inserted": torch.from_numpy(self.inserted.copy()),
            "data": None if self.data is None else self.data.detach().cpu().clone(),
        }

    def check_state(self, state: Mapping[str, Any]) -> None:
        """Raise `StateMismatchError` unless `state` is a memory bank this one can load."""
        def fail(why: str) -> None:
            raise StateMismatchError(f"rotta memory bank: {why}")

        if not isinstance(state, Mapping) or set(state) != set(self.state()):
            fail("not a RoTTA memory-bank state")
        if state["num_classes"] != self.num_classes:
            fail(f"{state['num_classes']} classes, this adapter's model has {self.num_classes}")
        if not isinstance(state["clock"], int) or state["clock"] < 0:
            fail("the sample clock must be an integer >= 0")
        for key, dtype in (("used", torch.bool), ("label", torch.int64), ("entropy", torch.float64),
                           ("inserted", torch.int64)):
            t = state[key]
            if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != (self.capacity,):
                fail(f"{key} must be a {dtype} tensor of {self.capacity} slots (the configured memory_size)")
        used = state["used"]
        if bool((state["label"][used] < 0).any()) or bool((state["label"][used] >= self.num_classes).any()):
            fail("a stored label is outside the model's classes")
        if bool((state["inserted"][used] < 0).any()) or bool((state["inserted"][used] >= state["clock"]).any()):
            fail("an item was stored at a sample count outside [0, clock)")
        if not bool(torch.isfinite(state["entropy"]).all()):
            fail("non-finite entropies")
        data = state["data"]
        if data is not None and (not isinstance(data, torch.Tensor) or data.dim() != 4
                                 or data.shape[0] != self.capacity or not data.is_floating_point()
                                 or not bool(torch.isfinite(data).all())):
            fail(f"data must be a finite float (capacity={self.capacity}, C, H, W) tensor")
        if data is None and bool(used.any()):
            fail("items are marked stored but no image data is given")

    def load_state(self, state: Mapping[str, Any], device: torch.device, dtype: torch.dtype) -> None:
        self.clock = int(state["clock"])
        for key in ("used", "label", "entropy", "inserted"):
            getattr(self, key)[:] = state[key].numpy()
        self.counts[:] = np.bincount(self.label[self.used], minlength=self.num_classes)
        data = state["data"]
        self.data = None if data is None else data.to(device=device, dtype=dtype).clone()


# ---------------------------------------------------------------------- the adapter
def timeliness_weights(ages: torch.Tensor) -> torch.Tensor:
    """Time-aware reweighting: exp(-a) / (1 + exp(-a)) of the normalised ages a = age / capacity."""
    return torch.exp(-ages) / (1 + torch.exp(-ages))


@register_adapter("rotta")
class RoTTA(TeacherStudentAdapter[RottaConfig]):
    """RoTTA (Yuan et al., CVPR 2023); see the module docstring."""

    Config = RottaConfig
    uses_batch_stats = False  # prediction normalises with the global statistics: a batch of one adapts

    def configure_model(self) -> None:
        cfg = self.config
        self.model.eval()
        self.model.requires_grad_(False)
        replace_with_robust_bn(self.model, cfg.bn_momentum)
        self._trainable = [p for m in self.model.modules() if isinstance(m, (RobustBatchNorm, *NORM_TYPES))
                           for p in (m.weight, m.bias) if p is not None]
        if not self._trainable:
            raise NoAdaptableLayerError(
                f"rotta: the model ({type(self.model).__name__}) has no BatchNorm/LayerNorm/GroupNorm layer with "
                "affine parameters to train"
            )
        for p in self._trainable:
            p.requires_grad_(True)
        self.build_teacher()
        self.memory: CategoryBalancedMemory | None = None  # sized by the first batch's classes
        self.instances = 0

    def collect_params(self) -> list[nn.Parameter]:
        return self._trainable

    def reset(self) -> None:
        super().reset()
        if self.memory is not None:
            self.memory.clear()
        self.instances = 0

    # ------------------------------------------------------------------ one batch
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        stored = self.memory.data if self.memory is not None and len(self.memory) else None
        if stored is not None and stored.shape[1:] != x.shape[1:]:
            raise InvalidInputError(
                f"rotta: the memory bank holds images of shape {tuple(stored.shape[1:])}, the batch has "
                f"{tuple(x.shape[1:])}; one adapter adapts one input size (set input_size, or reset())"
            )
        with torch.no_grad():
            self.model.eval()
            self.teacher.eval()
            logits = self.teacher(x)
            probs = logits.softmax(1)
            entropy = -(probs * torch.log(probs + 1e-6)).sum(1)
        if self.memory is None:
            self.memory = CategoryBalancedMemory(cfg.memory_size, logits.shape[1], cfg.lambda_t, cfg.lambda_u)
        memory = self.memory
        labels = probs.argmax(1).tolist()  # one transfer of the batch's pseudo-labels and entropies
        entropies = entropy.double().tolist()
        pending: dict[int, int] = {}  # slot -> row of x, written into the bank before the next update
        for row, (label, ent) in enumerate(zip(labels, entropies)):
            slot = memory.add(label, ent)
            if slot is not None:
                pending[slot] = row
            self.instances += 1
            if self.instances % cfg.update_frequency == 0:
                self._store(x, pending)
                self.update_model()
        self._store(x, pending)
        return logits

    def _store(self, x: torch.Tensor, pending: dict[int, int]) -> None:
        if not pending:
            return
        memory = self.memory
        assert memory is not None
        if memory.data is None or memory.data.shape[1:] != x.shape[1:]:
            memory.data = x.new_zeros((memory.capacity, *x.shape[1:]))
        slots = torch.tensor(list(pending), device=x.device)
        rows = torch.tensor(list(pending.values()), device=x.device)
        memory.data.index_copy_(0, slots, x.detach().index_select(0, rows))
        pending.clear()

    def update_model(self) -> None:
        """One timeliness-weighted teacher-student update on the memory bank."""
        memory = self.memory
        assert memory is not None and memory.data is not None
        order = memory.order()
        data = memory.data[torch.from_numpy(order).to(memory.data.device)]
        ages = torch.from_numpy(memory.ages()[order] / memory.capacity).to(device=data.device, dtype=torch.float32)
        param_gen, noise_gen = self.step_generators()
        params = self.augment.draw(1, tuple(data.shape[-2:]), param_gen)
        strong = self.augment.apply(data, params, self.augment.noise(1, data, noise_gen))[0]
        self.model.train()
        self.teacher.train()
        try:
            with self.train_mode_rng():
                with torch.no_grad():
                    teacher = self.teacher(data)
                student = self.model(strong)
        finally:
            self.model.eval()
            self.teacher.eval()
        weights = timeliness_weights(ages).to(student.dtype)
        loss = (soft_cross_entropy_per_sample(student, teacher) * weights).mean()
        if self.apply_loss(loss):
            self._count(updates=1)
        self.update_teacher(self.config.ema_momentum)

    # ------------------------------------------------------------------ state
    def _after_move(self) -> None:
        super()._after_move()
        if self.memory is not None and self.memory.data is not None:
            self.memory.data = self.memory.data.to(device=self.device, dtype=self._data_dtype())

    def _data_dtype(self) -> torch.dtype:
        return next(iter(self._trainable)).dtype

    def get_extra_state(self) -> dict[str, Any]:
        state = super().get_extra_state()
        state["rotta"] = {"instances": self.instances,
                          "memory": None if self.memory is None else self.memory.state()}
        return state

    def check_extra_state(self, extra: Mapping[str, Any], where: str) -> None:
        super().check_extra_state(extra, where)
        entry = extra.get("rotta")
        if not isinstance(entry, Mapping) or set(entry) != {"instances", "memory"}:
            raise StateMismatchError(f"{where}: the state has no RoTTA entry (instances, memory bank)")
        if not isinstance(entry["instances"], int) or entry["instances"] < 0:
            raise StateMismatchError(f"{where}: RoTTA's sample count must be an integer >= 0")
        mem = entry["memory"]
        if mem is None:
            return
        cfg = self.config
        num_classes = mem.get("num_classes") if isinstance(mem, Mapping) else None
        if not isinstance(num_classes, int) or num_classes < 2:
            raise StateMismatchError(f"{where}: RoTTA memory bank without a valid class count")
        probe = self.memory or CategoryBalancedMemory(cfg.memory_size, num_classes, cfg.lambda_t, cfg.lambda_u)
        try:
            probe.check_state(mem)
        except StateMismatchError as exc:
            raise StateMismatchError(f"{where}: {exc}") from None

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        entry = state["rotta"]
        self.instances = int(entry["instances"])
        mem = entry["memory"]
        if mem is None:
            self.memory = None
            return
        cfg = self.config
        if self.memory is None or self.memory.num_classes != mem["num_classes"]:
            self.memory = CategoryBalancedMemory(cfg.memory_size, mem["num_classes"], cfg.lambda_t, cfg.lambda_u)
        self.memory.load_state(mem, self.device, self._data_dtype())


__all__ = ["CategoryBalancedMemory", "RoTTA", "RobustBatchNorm", "RottaConfig", "replace_with_robust_bn",
           "timeliness_weights"]
