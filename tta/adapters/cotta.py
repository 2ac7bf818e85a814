"""CoTTA: continual test-time adaptation (Wang, Fink, Van Gool, Dai; CVPR 2022).

Student (trained), teacher (EMA of the student, momentum 0.999), anchor (frozen source copy, whose
tensors are also the source state for the stochastic restore and `reset()`). Every BatchNorm
normalises with test-batch statistics in all three. Trainable: every ``weight``/``bias``.

Per batch x:
 1. c = mean over the batch of max softmax(anchor(x));
 2. t = teacher(x); if c < ``ap``: t = mean of teacher(aug_i(x)) over ``n_views`` = 32 augmentations;
 3. loss = soft CE(t -> student(x)) (CIFAR) or symmetric CE (ImageNet); optimizer step;
 4. teacher EMA; stochastic restore of each element with probability ``restore_prob``;
 5. return t (the teacher's, possibly augmentation-averaged, output).

Two execution paths with the same results (tested against each other), written apart:

- `CoTTA.forward_and_adapt` (default, the fast path): augmentation only when the anchor is
  unconfident (the later reference code checks first; same result), the views run as batched
  forwards of ``views_per_forward`` views with per-view ("ghost") BatchNorm statistics (equal to
  separate forwards; `TeacherStudentAdapter.teacher_views`), batched augmentation (grey RGB
  batches augmented as one channel, bit-identical), the views fed channels_last (oneDNN's and cuDNN's
  faster layout; same values to fp32 rounding), `torch._foreach_*` EMA and one on-device draw for
  all restore masks.
- `CoTTA.reference_step` (``reference_mode=True``): the literal algorithm of the original CIFAR code,
  in its order: student, anchor, teacher, then the 32 augmented teacher passes always computed as
  32 separate forwards (and discarded when the anchor is confident), each view augmented on all
  three channels (no grey-image shortcut), restore masks drawn per parameter on the CPU, the EMA a
  Python loop.

The random draws are identical by construction: every step draws one seed from the adapter's CPU
generator; the augmentation parameters of all views come from a generator seeded with it, then the
noise of the views in order; the restore masks come from the adapter's generator on the model's
device (on CPU the same stream as the reference's per-parameter draws). On a CUDA device the fast
path draws its masks and noise on the GPU, so its random streams (not their distribution) differ
from `reference_mode`'s.

Train or eval mode (``model_mode``). The original CoTTA code puts the model in ``train()`` before
copying it, so student, teacher and anchor all run with dropout / stochastic depth active; the
reference CTTA library (mariodoebler/test-time-adaptation) uses ``eval()`` ("to avoid stochastic depth
in swin"; BatchNorm uses test-batch statistics either way). The default here is ``eval``: the
prediction is deterministic, and for BatchNorm-only models (the papers' WideResNets and ResNets) the
two are the same computation. ``model_mode="train"`` follows the original code; its dropout masks
come from the adapter's seed (`TeacherStudentAdapter.train_mode_rng`), so runs stay reproducible
and saved states exact. `tests/test_cotta.py` shows both on a model with dropout.

`adapter.counters["aug_used"]` / ``["aug_skipped"]`` count batches with/without the augmented
teacher; `augmentation_skip_fraction` reports the share skipped.

Presets (paper/reference code): cifar10 Adam 1e-3, restore 0.01, AP 0.92, soft CE; cifar100 AP 0.72;
imagenet SGD 0.01 momentum 0.9, Nesterov (the reference's ImageNet optimizer), restore 0.001, AP 0.1,
symmetric CE. For another model/dataset the authors' rule for AP is `confidence_threshold` (5%
quantile of the source model's max-softmax on source data, minus 0.05); model cards store it as
``cotta_threshold`` and ``ap=card`` on the CLI takes it from the card
(`tta.adapters.teacher.resolve_card_fields`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from tta.adapters.registry import register_adapter
from tta.adapters.teacher import (
    LOSSES,
    AnchoredTeacherAdapter,
    RestoringTeacherConfig,
    ema_update_reference,
)
from tta.errors import ConfigError
from tta.layers import calibrated_layers, replace_batchnorms


@dataclass
class CottaConfig(RestoringTeacherConfig):
    """CoTTA options; defaults are the CIFAR-10-C settings of the paper (the teacher fields are
    described in `tta.adapters.teacher`: ``ema_momentum`` 0.999, ``n_views`` 32, ``ap`` 0.92,
    ``loss``, ``views_per_forward``, ``views_memory_format``, ``restore_prob`` 0.01).

    reference_mode: run the slow literal algorithm (`CoTTA.reference_step`).
    model_mode: ``eval`` (default) or ``train`` for student, teacher and anchor (see the module
        docstring: matters only for dropout / stochastic depth).
    """

    n_views: int = 32
    views_memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"
    reference_mode: bool = False
    model_mode: Literal["eval", "train"] = "eval"

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "cifar10": {"optimizer": "adam", "lr": 1e-3, "restore_prob": 0.01, "ap": 0.92, "loss": "soft_ce"},
        "cifar100": {"optimizer": "adam", "lr": 1e-3, "restore_prob": 0.01, "ap": 0.72, "loss": "soft_ce"},
        "imagenet": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": True, "restore_prob": 0.001,
                     "ap": 0.1, "loss": "symmetric_ce"},
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model_mode not in ("eval", "train"):
            raise ConfigError(f"model_mode must be 'eval' or 'train', got {self.model_mode!r}")


@register_adapter("cotta")
class CoTTA(AnchoredTeacherAdapter[CottaConfig]):
    """CoTTA (Wang et al., CVPR 2022); see the module docstring for the algorithm and the paths."""

    Config = CottaConfig

    def configure_model(self) -> None:
        self.model.train(self.config.model_mode == "train")  # BN below uses batch statistics either way
        self.model.requires_grad_(False)
        replace_batchnorms(self.model, 0.0)
        self._trainable = [p for _, module in self.model.named_modules()
                           for name, p in module._parameters.items()
                           if name in ("weight", "bias") and p is not None]
        for p in self._trainable:
            p.requires_grad_(True)
        if not self._trainable:
            raise ConfigError(f"cotta: the model ({type(self.model).__name__}) has no weight/bias to train")
        self.uses_batch_stats = bool(calibrated_layers(self.model))
        self.build_teacher()

    def collect_params(self) -> Iterable[nn.Parameter]:
        return self._trainable

    @property
    def augmentation_skip_fraction(self) -> float:
        done = self.counters.get("aug_used", 0) + self.counters.get("aug_skipped", 0)
        return self.counters.get("aug_skipped", 0) / done if done else 0.0

    def _modes(self) -> contextlib.AbstractContextManager[None]:
        """Dropout masks of train-mode forwards drawn from the adapter's seed (nothing in eval mode)."""
        return self.train_mode_rng() if self.config.model_mode == "train" else contextlib.nullcontext()

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.reference_mode:
            return self.reference_step(x)
        cfg = self.config
        gens = self.step_generators()
        with self._modes():
            with torch.no_grad():
                use_aug = self.anchor_confidence(x) < cfg.ap
                teacher = self.teacher(x)
                if use_aug:
                    teacher = self.mean_view_logits(x, gens)
            # The student's forward draws nothing and changes no state, so it can follow the no-grad
            # forwards, which then run without the student's saved activations held beside them.
            student = self.model(x)
        self._count(**{"aug_used" if use_aug else "aug_skipped": 1})
        self.apply_loss(LOSSES[cfg.loss](student, teacher))
        self.update_teacher(cfg.ema_momentum)
        self.restore(cfg.restore_prob)
        return teacher

    def mean_view_logits(self, x: torch.Tensor, gens: tuple[torch.Generator, torch.Generator]) -> torch.Tensor:
        """Mean teacher logits over the views, summed chunk by chunk (no (V, B, K) tensor is kept)."""
        total = None
        for logits in self.teacher_views(x, gens):
            part = logits.sum(0)
            total = part if total is None else total + part
        assert total is not None
        return total / self.config.n_views

    def reference_step(self, x: torch.Tensor) -> torch.Tensor:
        """The original CIFAR code's step, literally (``reference_mode``; see the module docstring)."""
        cfg = self.config
        param_gen, noise_gen = self.step_generators()
        with self._modes():
            student = self.model(x)
            with torch.no_grad():
                confidence = self.anchor(x).softmax(1).amax(1).mean()
                standard = self.teacher(x)
                params = self.augment.draw(cfg.n_views, tuple(x.shape[-2:]), param_gen)
                outputs = []
                for i in range(cfg.n_views):
                    noise = self.augment.noise(1, x, noise_gen)
                    view = self.augment.apply(x, params.views(i, i + 1), noise, grey_rgb=False)[0]
                    outputs.append(self.teacher(view).detach())
                use_aug = float(confidence) < cfg.ap
                teacher = torch.stack(outputs).mean(0) if use_aug else standard
        self._count(**{"aug_used" if use_aug else "aug_skipped": 1})
        self.apply_loss(LOSSES[cfg.loss](student, teacher))
        ema_update_reference(self._teacher_params, self._student_params, cfg.ema_momentum)
        self.restore_reference(cfg.restore_prob)
        return teacher


@torch.no_grad()
def confidence_threshold(model: nn.Module, images: torch.Tensor, batch_size: int = 500,
                         quantile: float = 0.05, margin: float = 0.05) -> float:
    """The CoTTA authors' AP rule: the `quantile` of the source model's max-softmax confidence on
    source images (float [0, 1] NCHW, model in eval mode), minus `margin`."""
    if images.dim() != 4 or images.shape[0] == 0:
        raise ConfigError(f"confidence_threshold needs a non-empty (N, C, H, W) batch, got {tuple(images.shape)}")
    was_training = model.training
    model.eval()
    try:
        conf = torch.cat([model(images[i : i + batch_size]).softmax(1).amax(1).float()
                          for i in range(0, images.shape[0], batch_size)])
    finally:
        model.train(was_training)
    return float(torch.quantile(conf, quantile)) - margin


__all__ = ["CoTTA", "CottaConfig", "confidence_threshold"]
