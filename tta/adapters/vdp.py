"""VDP: visual domain prompts for continual test-time adaptation (Gan et al., AAAI 2023).

The source model is frozen (eval mode, no parameter or buffer ever changes); only image-level
prompts are learned and ADDED to the input pixels:

    x' = x + scale * (agnostic * frame_mask + specific * patch_mask)

Prompt placement (the paper's exact size/placement could not be retrieved; these are this
project's documented defaults, all parameters):

- domain-agnostic prompt (domain-shared knowledge): a frame of ``frame_width`` pixels along the
  image border (default: side / 16, at least 1 px);
- domain-specific prompt (current-domain knowledge): ``num_patches`` = 4 square patches of side
  ``patch_size`` (default: side / 8) at the four corners just inside the frame.

Both start at zero (the prompted model first computes the source model's output); scale 0.1,
Adam lr 1e-4 and EMA 0.999 follow the public relative SVDP.

Homeostasis (the formula is this project's choice, documented): the importance of every
domain-agnostic prompt element is a running mean of its squared gradient of the adaptation loss,
``F <- beta * F + (1 - beta) * g**2`` (``importance_decay`` beta = 0.9), and the optimizer's update
of that element is scaled by ``1 / (1 + lambda * F / mean(F))`` (``homeostasis`` lambda = 1.0):
elements that were sensitive across past batches move less. The update (not the gradient) is
scaled so the suppression also holds under Adam, which would cancel a steady gradient scale.
Domain-specific prompts are not suppressed.

Teacher-student: the teacher is the same frozen backbone with its own prompts, the EMA of the
student's (momentum 0.999); no model copy exists. The unprompted backbone is the source model, so
it serves as CoTTA's anchor for free. Per batch: when the anchor is uncertain (mean max-softmax
< ``ap``), the target is the teacher's output averaged over ``n_views`` CoTTA augmentations
(augmentation-based uncertainty handling as in CoTTA/ViDA; with zero-initialised prompts the clean
teacher equals the student, so only this target starts the adaptation); otherwise the teacher's
output on the clean input. Loss soft CE (CIFAR) / symmetric CE (ImageNet); the returned prediction
is the teacher's output on the clean input (as ViDA's). ``counters["aug_target"]`` counts augmented targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from tta.adapters.base import Adapter
from tta.adapters.config import OptimConfig
from tta.adapters.inputs import model_dtype
from tta.adapters.registry import register_adapter
from tta.adapters.teacher import LOSSES, ema_update_
from tta.augment import CottaAugment, stack_views
from tta.errors import ConfigError, InvalidInputError


class VisualPrompt(nn.Module):
    """Additive image prompts: a domain-agnostic frame and domain-specific corner patches."""

    def __init__(self, channels: int, size: tuple[int, int], frame_width: int, patch_size: int,
                 num_patches: int, scale: float) -> None:
        super().__init__()
        h, w = size
        if frame_width < 0 or 2 * frame_width >= min(h, w):
            raise ConfigError(f"frame_width {frame_width} does not fit a {h}x{w} image")
        if num_patches not in (0, 1, 2, 3, 4):
            raise ConfigError(f"num_patches must be 0..4 (corner patches), got {num_patches}")
        if num_patches and (patch_size < 1 or 2 * (frame_width + patch_size) > min(h, w)):
            raise ConfigError(f"patch_size {patch_size} does not fit inside the frame of a {h}x{w} image")
        self.scale = float(scale)
        self.size = (h, w)
        frame = torch.zeros(1, h, w)
        if frame_width:
            frame[:, :frame_width] = 1
            frame[:, -frame_width:] = 1
            frame[:, :, :frame_width] = 1
            frame[:, :, -frame_width:] = 1
        patches = torch.zeros(1, h, w)
        f, p = frame_width, patch_size
        corners = [(f, f), (f, w - f - p), (h - f - p, f), (h - f - p, w - f - p)][:num_patches]
        for top, left in corners:
            patches[:, top : top + p, left : left + p] = 1
        self.register_buffer("frame_mask", frame)
        self.register_buffer("patch_mask", patches)
        self.agnostic = nn.Parameter(torch.zeros(channels, h, w))
        self.specific = nn.Parameter(torch.zeros(channels, h, w))

    def prompt(self) -> torch.Tensor:
        return self.scale * (self.agnostic * self.frame_mask + self.specific * self.patch_mask)

    def check(self, x: torch.Tensor) -> None:
        if tuple(x.shape[-2:]) != self.size:
            raise InvalidInputError(
                f"vdp: the prompts are {self.size[0]}x{self.size[1]} but the batch has shape {tuple(x.shape)}; "
                "set image_size to the model's input size"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        return x + self.prompt()


class PromptedModel(nn.Module):
    """backbone(prompt(x)); built on the fly (not registered) so the backbone is not listed twice."""

    def __init__(self, backbone: nn.Module, prompt: VisualPrompt) -> None:
        super().__init__()
        self.backbone = backbone
        self.prompt = prompt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.prompt(x))


@dataclass
class VdpConfig(OptimConfig):
    """VDP options (defaults documented in the module docstring).

    image_size: prompt height/width; 0 = the adapter's input size (``input_size``, or what the model
        declares: card, timm ``img_size``/``pretrained_cfg``), else 32.
    frame_width / patch_size: prompt geometry in pixels; 0 = side / 16 (>= 1) and side / 8 (>= 1).
    num_patches: domain-specific corner patches (4). scale: prompt scale (0.1).
    ema_momentum: teacher prompt EMA (0.999). homeostasis: suppression strength lambda (1.0; 0 = off).
    importance_decay: beta of the running mean of squared gradients (0.9).
    n_views: augmented teacher passes (10). ap: anchor-confidence threshold (0.92, CoTTA CIFAR-10).
    loss: ``soft_ce`` (CIFAR) or ``symmetric_ce`` (ImageNet).
    """

    lr: float = 1e-4
    image_size: int = 0
    frame_width: int = 0
    patch_size: int = 0
    num_patches: int = 4
    scale: float = 0.1
    ema_momentum: float = 0.999
    homeostasis: float = 1.0
    importance_decay: float = 0.9
    n_views: int = 10
    ap: float = 0.92
    loss: Literal["soft_ce", "symmetric_ce"] = "soft_ce"

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "cifar10": {"optimizer": "adam", "lr": 1e-4, "loss": "soft_ce"},
        "cifar100": {"optimizer": "adam", "lr": 1e-4, "loss": "soft_ce"},
        "imagenet": {"optimizer": "adam", "lr": 1e-4, "loss": "symmetric_ce"},
    }

    #: config keys a model card can supply (``--set ap=card``): the CoTTA threshold of the card
    CARD_FIELDS: ClassVar[dict[str, str]] = {"ap": "cotta_threshold"}

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("image_size", "frame_width", "patch_size"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        if not 0.0 <= self.ema_momentum <= 1.0 or not 0.0 <= self.importance_decay < 1.0:
            raise ConfigError("ema_momentum must be in [0, 1] and importance_decay in [0, 1)")
        if self.homeostasis < 0:
            raise ConfigError(f"homeostasis must be >= 0, got {self.homeostasis}")
        if self.n_views < 2:
            raise ConfigError(f"n_views must be >= 2, got {self.n_views}")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")


def model_image_size(model: nn.Module) -> int | None:
    """The input side a timm model was built for (``img_size`` / ``pretrained_cfg``), else None."""
    for m in model.modules():
        size = getattr(m, "img_size", None)
        if size is not None:
            return int(size[0] if isinstance(size, (tuple, list)) else size)
        cfg = getattr(m, "pretrained_cfg", None)
        if isinstance(cfg, dict) and cfg.get("input_size"):
            return int(cfg["input_size"][-1])
    return None


@register_adapter("vdp")
class VDP(Adapter[VdpConfig]):
    """VDP (Gan et al., AAAI 2023): frozen model, learned additive image prompts; see the module docstring."""

    Config = VdpConfig

    def configure_model(self) -> None:
        cfg = self.config
        self.model.eval()
        self.model.requires_grad_(False)
        if cfg.image_size:
            size = (cfg.image_size, cfg.image_size)
        else:
            declared = model_image_size(self.model)
            size = self.input_size or ((declared, declared) if declared else (32, 32))
        self.input_size = size  # the prompts fit this size only: the batch check enforces it
        side = min(size)
        channels = self.in_channels or 3
        frame = cfg.frame_width or max(1, side // 16)
        patch = cfg.patch_size or max(1, side // 8)
        to = {"device": self.device, "dtype": model_dtype(self.model) or torch.float32}
        self.prompt = VisualPrompt(channels, size, frame, patch, cfg.num_patches, cfg.scale).to(**to)
        self.teacher_prompt = VisualPrompt(channels, size, frame, patch, cfg.num_patches, cfg.scale).to(**to)
        self.teacher_prompt.requires_grad_(False)
        self.register_buffer("importance", torch.zeros_like(self.prompt.agnostic))
        self.augment = CottaAugment()
        self.__dict__["_student"] = PromptedModel(self.model, self.prompt)
        self.__dict__["_teacher"] = PromptedModel(self.model, self.teacher_prompt)

    def collect_params(self) -> list[nn.Parameter]:
        return [self.prompt.agnostic, self.prompt.specific]

    def adapted_parameters(self) -> list[torch.Tensor]:
        return super().adapted_parameters() + [self.teacher_prompt.agnostic, self.teacher_prompt.specific]

    def prediction_model(self) -> nn.Module:
        return self.__dict__["_teacher"]

    def reset(self) -> None:
        super().reset()
        with torch.no_grad():
            for t in (self.prompt.agnostic, self.prompt.specific, self.teacher_prompt.agnostic,
                      self.teacher_prompt.specific, self.importance):
                t.zero_()

    def _step_generators(self) -> tuple[torch.Generator, torch.Generator]:
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator("cpu")))
        cpu = torch.Generator().manual_seed(seed)
        dev = self.device
        return cpu, (cpu if dev.type == "cpu" else torch.Generator(device=dev).manual_seed(seed))

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        teacher_model = self.__dict__["_teacher"]
        self.prompt.check(x)
        with torch.no_grad():
            param_gen, noise_gen = self._step_generators()
            uncertain = float(self.model(x).softmax(1).amax(1).mean()) < cfg.ap
            teacher = teacher_model(x)
            target = teacher
            if uncertain:
                params = self.augment.draw(cfg.n_views, tuple(x.shape[-2:]), param_gen)
                views = self.augment.apply(x, params, self.augment.noise(cfg.n_views, x, noise_gen))
                target = teacher_model(stack_views(views)).view(cfg.n_views, x.shape[0], -1).mean(0)
        key = "aug_target" if uncertain else "clean_target"
        self.counters[key] = self.counters.get(key, 0) + 1
        student = self.__dict__["_student"](x)
        self.apply_loss(LOSSES[cfg.loss](student, target))
        ema_update_([self.teacher_prompt.agnostic, self.teacher_prompt.specific],
                    [self.prompt.agnostic, self.prompt.specific], cfg.ema_momentum)
        return teacher

    def optimizer_step(self) -> None:
        """Homeostatic step: importance <- running mean of g^2; step; shrink the agnostic prompt's update."""
        cfg = self.config
        assert self.optimizer is not None
        agn = self.prompt.agnostic
        with torch.no_grad():
            if agn.grad is not None:
                self.importance.mul_(cfg.importance_decay).addcmul_(agn.grad, agn.grad, value=1 - cfg.importance_decay)
            before = agn.detach().clone()
        self.optimizer.step()
        if cfg.homeostasis > 0:
            with torch.no_grad():
                mask = self.prompt.frame_mask.expand_as(agn) > 0
                mean = self.importance[mask].mean() if bool(mask.any()) else self.importance.mean()
                # importance relative to its mean over the frame (scale-free: gradients can be tiny)
                ratio = self.importance / mean.clamp_min(torch.finfo(mean.dtype).tiny)
                keep = 1.0 / (1.0 + cfg.homeostasis * ratio)
                agn.lerp_(before, 1.0 - keep)  # before + (after - before) * keep


__all__ = ["PromptedModel", "VDP", "VdpConfig", "VisualPrompt", "model_image_size"]
