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

Two execution paths with the same results (tested against each other):

- ``reference_mode=True``: the literal algorithm of the original CIFAR code: the 32 augmented
  teacher passes are always computed as 32 separate forwards (and discarded when the anchor is
  confident), each view is augmented on all three channels (no grey-image shortcut), restore masks
  are drawn per parameter on the CPU, the EMA is a Python loop.
- fast path (default): augmentation only when the anchor is unconfident (the later reference code
  checks first; same result), the views run as batched forwards of ``views_per_forward`` views with
  per-view ("ghost") BatchNorm statistics (equal to separate forwards), batched augmentation (grey
  RGB batches augmented as one channel, bit-identical), the views fed channels_last on CPUs
  (oneDNN's native layout; same values to fp32 rounding), `torch._foreach_*` EMA and one on-device
  draw for all restore masks.

The random draws are identical by construction: every step draws one seed from the adapter's CPU
generator; the augmentation parameters of all views come from a generator seeded with it, then the
noise of the views in order; the restore masks come from the adapter's generator on the model's
device (on CPU the same stream as the reference's per-parameter draws). On a CUDA device the fast
path draws its masks and noise on the GPU, so its random streams (not their distribution) differ
from `reference_mode`'s.

`adapter.counters["aug_used"]` / ``["aug_skipped"]`` count batches with/without the augmented
teacher; `augmentation_skip_fraction` reports the share skipped.

Presets (paper/reference code): cifar10 Adam 1e-3, restore 0.01, AP 0.92, soft CE; cifar100 AP 0.72;
imagenet SGD 0.01 momentum 0.9, restore 0.001, AP 0.1, symmetric CE. For another model/dataset the
authors' rule for AP is `confidence_threshold` (5% quantile of the source model's max-softmax on
source data, minus 0.05); model cards store it as ``cotta_threshold`` and ``ap=card`` on the CLI
takes it from the card (`tta.adapters.teacher.resolve_card_fields`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from tta.adapters.config import OptimConfig
from tta.adapters.registry import register_adapter
from tta.adapters.teacher import LOSSES, TeacherStudentAdapter
from tta.augment import CottaAugment, is_grey_rgb, stack_views
from tta.errors import ConfigError
from tta.layers import calibrated_layers, replace_batchnorms

MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


@dataclass
class CottaConfig(OptimConfig):
    """CoTTA options; defaults are the CIFAR-10-C settings of the paper.

    ema_momentum: teacher EMA momentum m (0.999).
    restore_prob: per-element probability of the stochastic restore each step (RST, 0.01).
    ap: anchor-confidence threshold below which the augmentation-averaged teacher is used (0.92).
    n_views: augmented teacher passes (32).
    loss: ``soft_ce`` (CIFAR) or ``symmetric_ce`` (ImageNet).
    reference_mode: run the slow literal algorithm (see the module docstring).
    views_per_forward: views per batched (ghost-BN) teacher forward on the fast path; 0 = auto:
        all ``n_views`` in one forward on GPUs (many small forwards become one), 1 on CPUs, where a
        bigger batch runs no faster and ghost BN costs more than the fused per-view BatchNorm
        (timm resnet50, 2 views x 16 images at 224 px: 16.3 s batched vs 13.8 s separate on the
        2-core box). Lower it to bound memory (large images).
    views_memory_format: memory format of the augmented views fed to the teacher on the fast path:
        ``channels_last``, ``contiguous`` (NCHW) or ``auto`` = channels_last on CPUs (oneDNN's
        convolutions run NHWC natively: 1.24x faster CoTTA steps for ResNet-20, B=200, N=32 on the
        2-core box, outputs within 3e-6 of NCHW), the input's format elsewhere.
    """

    ema_momentum: float = 0.999
    restore_prob: float = 0.01
    ap: float = 0.92
    n_views: int = 32
    loss: Literal["soft_ce", "symmetric_ce"] = "soft_ce"
    reference_mode: bool = False
    views_per_forward: int = 0
    views_memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "cifar10": {"optimizer": "adam", "lr": 1e-3, "restore_prob": 0.01, "ap": 0.92, "loss": "soft_ce"},
        "cifar100": {"optimizer": "adam", "lr": 1e-3, "restore_prob": 0.01, "ap": 0.72, "loss": "soft_ce"},
        "imagenet": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "restore_prob": 0.001, "ap": 0.1,
                     "loss": "symmetric_ce"},
    }
    #: config keys a model card can supply (``--set ap=card``): config key -> card attribute
    CARD_FIELDS: ClassVar[dict[str, str]] = {"ap": "cotta_threshold"}

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.ema_momentum <= 1.0:
            raise ConfigError(f"ema_momentum must be in [0, 1], got {self.ema_momentum}")
        if not 0.0 <= self.restore_prob <= 1.0:
            raise ConfigError(f"restore_prob must be in [0, 1], got {self.restore_prob}")
        if self.n_views < 1:
            raise ConfigError(f"n_views must be >= 1, got {self.n_views}")
        if self.views_per_forward < 0:
            raise ConfigError(f"views_per_forward must be >= 0 (0 = all views), got {self.views_per_forward}")
        if self.views_memory_format not in MEMORY_FORMATS:
            raise ConfigError(f"views_memory_format must be one of {', '.join(MEMORY_FORMATS)}, "
                              f"got {self.views_memory_format!r}")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")


@register_adapter("cotta")
class CoTTA(TeacherStudentAdapter[CottaConfig]):
    """CoTTA (Wang et al., CVPR 2022); see the module docstring for the algorithm and the paths."""

    Config = CottaConfig

    def configure_model(self) -> None:
        self.model.eval()  # no dropout / stochastic depth; BN below uses batch statistics anyway
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
        self._build_copies()
        self._teacher_bn = calibrated_layers(self.teacher)
        self.augment = CottaAugment()

    def collect_params(self) -> Iterable[nn.Parameter]:
        return self._trainable

    @property
    def augmentation_skip_fraction(self) -> float:
        done = self.counters.get("aug_used", 0) + self.counters.get("aug_skipped", 0)
        return self.counters.get("aug_skipped", 0) / done if done else 0.0

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        param_gen, noise_gen = self.step_generators()
        if cfg.reference_mode:
            student = self.model(x)  # the original order: student, anchor, teacher
        with torch.no_grad():
            confidence = float(self.anchor(x).softmax(1).amax(1).mean())
            teacher = self.teacher(x)
            use_aug = confidence < cfg.ap
            if cfg.reference_mode:
                views = self._augmented_teacher_reference(x, param_gen, noise_gen)
                if use_aug:
                    teacher = views
            elif use_aug:
                teacher = self._augmented_teacher(x, param_gen, noise_gen)
        if not cfg.reference_mode:
            # The same values in a cheaper order: the student's forward draws nothing and changes
            # no state, so it can follow the no-grad forwards, which then run without the
            # student's saved activations (a training batch's worth) held beside them.
            student = self.model(x)
        self.counters["aug_used" if use_aug else "aug_skipped"] = (
            self.counters.get("aug_used" if use_aug else "aug_skipped", 0) + 1
        )
        self.apply_loss(LOSSES[cfg.loss](student, teacher))
        self.update_teacher(cfg.ema_momentum, reference=cfg.reference_mode)
        self.restore(cfg.restore_prob, reference=cfg.reference_mode)
        return teacher

    def _augmented_teacher(self, x: torch.Tensor, param_gen: torch.Generator, noise_gen: torch.Generator) -> torch.Tensor:
        """Mean teacher logits over the views, `views_per_forward` views per ghost-BN forward."""
        cfg = self.config
        n = cfg.n_views
        chunk = views_per_forward(cfg.views_per_forward, n, x.device)
        channels_last = views_channels_last(cfg.views_memory_format, x)
        grey = is_grey_rgb(x)  # once per batch, not per chunk of views
        params = self.augment.draw(n, tuple(x.shape[-2:]), param_gen)
        total = None
        for start in range(0, n, chunk):
            k = min(chunk, n - start)
            noise = self.augment.noise(k, x, noise_gen)
            views = self.augment.apply(x, params.views(start, start + k), noise, grey)
            for layer in self._teacher_bn:
                layer.ghost_groups = k
            try:
                batch = stack_views(views)
                if channels_last:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                logits = self.teacher(batch).view(k, x.shape[0], -1)
            finally:
                for layer in self._teacher_bn:
                    layer.ghost_groups = 1
            part = logits.sum(0)
            total = part if total is None else total + part
        assert total is not None
        return total / n

    def _augmented_teacher_reference(
        self, x: torch.Tensor, param_gen: torch.Generator, noise_gen: torch.Generator
    ) -> torch.Tensor:
        """The original loop: one augmentation and one teacher forward per view, then the mean."""
        cfg = self.config
        params = self.augment.draw(cfg.n_views, tuple(x.shape[-2:]), param_gen)
        outputs = []
        for i in range(cfg.n_views):
            noise = self.augment.noise(1, x, noise_gen)
            view = self.augment.apply(x, params.views(i, i + 1), noise, grey_rgb=False)[0]
            outputs.append(self.teacher(view).detach())
        return torch.stack(outputs).mean(0)


def views_per_forward(configured: int, n_views: int, device: torch.device) -> int:
    """Views per batched forward: the configured count, or auto (0): all on GPUs, 1 on CPUs."""
    if configured:
        return configured
    return 1 if device.type == "cpu" else n_views


def views_channels_last(configured: str, x: torch.Tensor) -> bool:
    """Whether the fast path feeds the views channels_last: as configured, or auto (CPU, 4-D)."""
    if x.dim() != 4 or configured == "contiguous":
        return False
    return configured == "channels_last" or x.device.type == "cpu"


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


__all__ = ["CoTTA", "CottaConfig", "confidence_threshold", "views_channels_last", "views_per_forward"]
