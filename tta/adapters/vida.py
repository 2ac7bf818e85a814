"""ViDA: homeostatic visual domain adapters (Liu et al., ICLR 2024).

Injection: every Linear of the attention blocks (timm ViT: each block's ``attn.qkv`` and
``attn.proj``; the MLP is not injected) becomes

    y = W x + b + up_low(down_low(x)) * s_low + up_high(down_high(x)) * s_high

with a low-rank branch (rank 1) and a high-rank branch (rank 128), no biases on the branches,
``down ~ N(0, std = 1 / r**2)`` and ``up = 0`` (so the injected model computes exactly what the
source model did). CNN analogue (the project's extension, not in the paper): each ``Conv2d``
(groups = 1) gets the same two branches beside it, ``down`` a convolution with the layer's
kernel/stride/padding/dilation into r channels and ``up`` a 1x1 convolution back (so the branch
output has the layer's output geometry); BatchNorm layers use batch statistics as in CoTTA.

Per batch x (teacher = EMA of the student):
 1. teacher logits on ``n_views`` = 10 CoTTA augmentations of x (batched; ghost BN for CNNs);
 2. u = 0.1 * mean over batch and classes of the variance across views;
 3. HKA: u >= threshold: s_high = 1 + u, s_low = 1 - u; else s_low = 1 + u, s_high = 1 - u, set on
    student and teacher (``hka="reference"`` reproduces the reference code's `elif` bug: s_high is
    never updated and stays 1, only s_low moves; default ``"paper"``);
 4. target: the teacher's output on x, or the mean over the views when the anchor (frozen source
    copy) is unconfident (mean max-softmax < ``ap``, CoTTA's rule, which the reference code built
    on CoTTA's keeps; ``ap=0`` gives the clean target only). Without it the student equals the
    teacher at the first step and the soft CE has zero gradient forever.
    loss: soft CE(target -> student(x)) (CIFAR) or symmetric CE (ImageNet); one step with two
    optimizer groups (model parameters at ``lr``, adapter parameters at ``adapter_lr``);
 5. teacher EMA (``ema_momentum`` for model, ``adapter_ema_momentum`` for adapter parameters) and a
    stochastic restore of every trainable weight/bias (the reference CIFAR code restores with
    p = 0.1, its hidden default; ImageNet: no restore);
 6. return the teacher's output on the clean input (computed after the HKA scales are set).

The reference code starts from adapters warmed up on source data: `warmup_adapters` trains the
adapters of a source model with cross-entropy on labelled source images (`tta warmup-adapters`)
and `save_adapter_weights` stores them; ``adapter_weights=<file>`` loads them. Without warm-up the
adapters start at the injection init (up = 0), a documented deviation.

Presets: cifar10/cifar100 Adam, lr 1e-4 / adapter 1e-5, threshold 0.05, restore 0.1, soft CE;
imagenet SGD momentum 0.9, lr 5e-7 / adapter 2e-7, threshold 0.2, no restore, symmetric CE.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from tta.adapters.config import OptimConfig
from tta.adapters.registry import register_adapter
from tta.adapters.teacher import LOSSES, TeacherStudentAdapter, augmentation_uncertainty, ema_update_
from tta.adapters.cotta import views_per_forward
from tta.augment import CottaAugment, is_grey_rgb, stack_views
from tta.errors import ConfigError, DataNotFoundError, NoAdaptableLayerError
from tta.layers import calibrated_layers, replace_batchnorms

ADAPTER_PREFIXES = ("down_low", "up_low", "down_high", "up_high")


class _ViDABranches(nn.Module):
    """The two adapter branches and the shared HKA scales; mixed into the injected layers."""

    down_low: nn.Module
    up_low: nn.Module
    down_high: nn.Module
    up_high: nn.Module
    scales: torch.Tensor  # (2,): s_low, s_high; one tensor shared by every layer of a model

    def _init_branches(self, generator: torch.Generator) -> None:
        for down, up in ((self.down_low, self.up_low), (self.down_high, self.up_high)):
            rank = down.weight.shape[0]
            with torch.no_grad():
                down.weight.copy_(torch.randn(down.weight.shape, generator=generator) / rank**2)
                up.weight.zero_()

    def branches(self, x: torch.Tensor) -> torch.Tensor:
        return self.up_low(self.down_low(x)) * self.scales[0] + self.up_high(self.down_high(x)) * self.scales[1]


class ViDALinear(nn.Linear, _ViDABranches):
    """A Linear with ViDA's low-/high-rank branches; keeps the wrapped layer's weight/bias objects."""

    def __init__(self, base: nn.Linear, low_rank: int, high_rank: int, scales: torch.Tensor,
                 generator: torch.Generator) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        kw = {"bias": False, "device": base.weight.device, "dtype": base.weight.dtype}
        self.down_low = nn.Linear(self.in_features, low_rank, **kw)
        self.up_low = nn.Linear(low_rank, self.out_features, **kw)
        self.down_high = nn.Linear(self.in_features, high_rank, **kw)
        self.up_high = nn.Linear(high_rank, self.out_features, **kw)
        self.register_buffer("scales", scales)
        self._init_branches(generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.branches(x)


class ViDAConv2d(nn.Conv2d, _ViDABranches):
    """CNN analogue: branches beside a Conv2d (down: the layer's geometry into r channels, up: 1x1)."""

    def __init__(self, base: nn.Conv2d, low_rank: int, high_rank: int, scales: torch.Tensor,
                 generator: torch.Generator) -> None:
        nn.Module.__init__(self)
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                     "transposed", "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(self, attr, getattr(base, attr))
        self.weight = base.weight
        self.bias = base.bias
        kw = {"bias": False, "device": base.weight.device, "dtype": base.weight.dtype}
        geo = {"kernel_size": base.kernel_size, "stride": base.stride, "padding": base.padding,
               "dilation": base.dilation, "padding_mode": base.padding_mode}
        self.down_low = nn.Conv2d(self.in_channels, low_rank, **geo, **kw)
        self.up_low = nn.Conv2d(low_rank, self.out_channels, 1, **kw)
        self.down_high = nn.Conv2d(self.in_channels, high_rank, **geo, **kw)
        self.up_high = nn.Conv2d(high_rank, self.out_channels, 1, **kw)
        self.register_buffer("scales", scales)
        self._init_branches(generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight, self.bias) + self.branches(x)


def _is_attention(module: nn.Module) -> bool:
    return "attention" in type(module).__name__.lower() and not isinstance(module, nn.MultiheadAttention)


def inject_adapters(model: nn.Module, low_rank: int = 1, high_rank: int = 128,
                    targets: tuple[str, ...] = ("qkv", "proj"), seed: int = 0) -> list[_ViDABranches]:
    """Inject ViDA branches in place; returns the injected layers (all share one scales tensor).

    Transformers: the Linear children named in `targets` of every attention module. Models without
    attention modules: every Conv2d with groups = 1 (the documented CNN analogue).
    """
    if any(isinstance(m, _ViDABranches) for m in model.modules()):
        raise ConfigError("the model already has ViDA adapters injected")
    device = next(model.parameters()).device
    scales = torch.ones(2, device=device)
    gen = torch.Generator().manual_seed(seed)
    injected: list[_ViDABranches] = []
    attention = [m for m in model.modules() if _is_attention(m)]
    if attention:
        for attn in attention:
            for name in targets:
                child = getattr(attn, name, None)
                if isinstance(child, nn.Linear) and not isinstance(child, ViDALinear):
                    layer = ViDALinear(child, low_rank, high_rank, scales, gen)
                    setattr(attn, name, layer)
                    injected.append(layer)
    else:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Conv2d and child.groups == 1:
                    layer = ViDAConv2d(child, low_rank, high_rank, scales, gen)
                    setattr(parent, name, layer)
                    injected.append(layer)
    if not injected:
        raise NoAdaptableLayerError(
            f"vida: found no attention Linear named {', '.join(targets)} and no Conv2d in {type(model).__name__}"
        )
    return injected


def adapter_parameter_names(model: nn.Module) -> list[str]:
    """Names (in `model.named_parameters()`) of the injected branch parameters."""
    return [n for n, _ in model.named_parameters() if any(f".{p}." in f".{n}" for p in ADAPTER_PREFIXES)]


def save_adapter_weights(model: nn.Module, path: str | os.PathLike[str], metadata: dict[str, Any] | None = None) -> Path:
    """Write the branch weights of an injected model to a safetensors file (with JSON metadata)."""
    from safetensors.torch import save_file

    params = dict(model.named_parameters())
    tensors = {n: params[n].detach().cpu().contiguous() for n in adapter_parameter_names(model)}
    if not tensors:
        raise ConfigError("the model has no ViDA adapters to save")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"vida": json.dumps(metadata or {})})
    return path


def load_adapter_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load branch weights written by `save_adapter_weights` (names and shapes are checked)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"no ViDA adapter weights at {path} (make them with `tta warmup-adapters`)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataNotFoundError(f"{path} is not a readable safetensors file: {exc}") from exc
    params = dict(model.named_parameters())
    expected = set(adapter_parameter_names(model))
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise DataNotFoundError(
            f"{path} does not match this model's ViDA adapters (missing {missing[:3]}, unexpected {extra[:3]}); "
            "were they warmed up on another model or with other ranks?"
        )
    with torch.no_grad():
        for name, t in tensors.items():
            if t.shape != params[name].shape:
                raise DataNotFoundError(f"{path}: {name} has shape {tuple(t.shape)}, the model expects "
                                        f"{tuple(params[name].shape)}")
            params[name].copy_(t)


@dataclass
class VidaConfig(OptimConfig):
    """ViDA options; defaults are the CIFAR-10-C settings of the reference code.

    lr / adapter_lr: learning rates of the model and the adapter parameter groups (1e-4 / 1e-5).
    ema_momentum / adapter_ema_momentum: teacher EMA momenta (0.999 / 0.999).
    low_rank / high_rank: ranks of the two branches (1 / 128).
    n_views: augmented teacher passes for the uncertainty (10).
    threshold: HKA uncertainty threshold (0.05).
    ap: anchor-confidence threshold below which the view-averaged teacher is the target (0.92).
    restore_prob: stochastic restore probability (0.1, the reference CIFAR code's hidden default).
    loss: ``soft_ce`` (CIFAR) or ``symmetric_ce`` (ImageNet).
    hka: ``paper`` (both scales follow the uncertainty) or ``reference`` (the `elif` bug).
    adapter_weights: safetensors file of warmed-up adapters (`tta warmup-adapters`); None = init.
    targets: names of the attention Linear layers to inject.
    views_per_forward: views per batched teacher forward (0 = auto: all on GPUs, 1 on CPUs).
    """

    lr: float = 1e-4
    adapter_lr: float = 1e-5
    ema_momentum: float = 0.999
    adapter_ema_momentum: float = 0.999
    low_rank: int = 1
    high_rank: int = 128
    n_views: int = 10
    threshold: float = 0.05
    ap: float = 0.92
    restore_prob: float = 0.1
    loss: Literal["soft_ce", "symmetric_ce"] = "soft_ce"
    hka: Literal["paper", "reference"] = "paper"
    adapter_weights: str | None = None
    targets: tuple[str, ...] = ("qkv", "proj")
    views_per_forward: int = 0

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "cifar10": {"optimizer": "adam", "lr": 1e-4, "adapter_lr": 1e-5, "threshold": 0.05, "restore_prob": 0.1,
                    "loss": "soft_ce"},
        "cifar100": {"optimizer": "adam", "lr": 1e-4, "adapter_lr": 1e-5, "threshold": 0.05, "restore_prob": 0.1,
                     "loss": "soft_ce"},
        "imagenet": {"optimizer": "sgd", "momentum": 0.9, "lr": 5e-7, "adapter_lr": 2e-7, "threshold": 0.2,
                     "restore_prob": 0.0, "loss": "symmetric_ce"},
    }

    #: config keys a model card can supply (``--set ap=card``): the CoTTA threshold of the card
    CARD_FIELDS: ClassVar[dict[str, str]] = {"ap": "cotta_threshold"}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.low_rank < 1 or self.high_rank < 1:
            raise ConfigError(f"ranks must be >= 1, got low_rank={self.low_rank}, high_rank={self.high_rank}")
        if not self.adapter_lr > 0:
            raise ConfigError(f"adapter_lr must be > 0, got {self.adapter_lr}")
        for key in ("ema_momentum", "adapter_ema_momentum", "restore_prob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"{key} must be in [0, 1], got {getattr(self, key)}")
        if self.n_views < 2:
            raise ConfigError(f"n_views must be >= 2 (a variance across views), got {self.n_views}")
        if self.hka not in ("paper", "reference"):
            raise ConfigError(f"hka must be 'paper' or 'reference', got {self.hka!r}")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.views_per_forward < 0:
            raise ConfigError(f"views_per_forward must be >= 0, got {self.views_per_forward}")


@register_adapter("vida")
class ViDA(TeacherStudentAdapter[VidaConfig]):
    """ViDA (Liu et al., ICLR 2024); see the module docstring."""

    Config = VidaConfig

    def configure_model(self) -> None:
        cfg = self.config
        self.model.eval()
        replace_batchnorms(self.model, 0.0)
        inject_adapters(self.model, cfg.low_rank, cfg.high_rank, tuple(cfg.targets), seed=self._seed)
        if cfg.adapter_weights:
            load_adapter_weights(self.model, cfg.adapter_weights)
        self.model.requires_grad_(True)
        self.uses_batch_stats = bool(calibrated_layers(self.model))
        names = set(adapter_parameter_names(self.model))
        self._adapter_names = [n for n, _ in self.model.named_parameters() if n in names]
        self._model_names = [n for n, _ in self.model.named_parameters() if n not in names]
        self._build_copies()
        self._teacher_bn = calibrated_layers(self.teacher)
        self.augment = CottaAugment()

    def collect_params(self) -> list[dict[str, Any]]:
        cfg = self.config
        params = dict(self.model.named_parameters())
        return [
            {"params": [params[n] for n in self._model_names], "lr": cfg.lr},
            {"params": [params[n] for n in self._adapter_names], "lr": cfg.adapter_lr},
        ]

    def _bind_pairs(self) -> None:
        super()._bind_pairs()
        student, teacher = dict(self.model.named_parameters()), dict(self.teacher.named_parameters())
        self._ema_groups = [
            ([teacher[n] for n in names], [student[n] for n in names])
            for names in (self._model_names, self._adapter_names)
        ]
        self._bind_scales()

    def _bind_scales(self) -> None:
        """One HKA scales tensor per model, shared by all its injected layers (student, teacher)."""
        student = [m for m in self.model.modules() if isinstance(m, _ViDABranches)]
        teacher = [m for m in self.teacher.modules() if isinstance(m, _ViDABranches)]
        for layers in (student, teacher):
            for layer in layers[1:]:
                layer.scales = layers[0].scales  # `.to()` moves each layer's buffer separately
        self._student_scales = student[0].scales
        self._teacher_scales = teacher[0].scales

    def _after_move(self) -> None:
        super()._after_move()
        self._bind_scales()

    def update_teacher(self, momentum: float, reference: bool = False) -> None:
        cfg = self.config
        for (t, s), m in zip(self._ema_groups, (cfg.ema_momentum, cfg.adapter_ema_momentum)):
            ema_update_(t, s, m)

    @torch.no_grad()
    def _set_scales(self, u: torch.Tensor) -> None:
        cfg = self.config
        high_domain = u >= cfg.threshold
        low = torch.where(high_domain, 1 - u, 1 + u)
        high = torch.where(high_domain, 1 + u, 1 - u) if cfg.hka == "paper" else self._student_scales[1]
        scales = torch.stack((low, high.to(low.dtype)))
        self._student_scales.copy_(scales)
        self._teacher_scales.copy_(scales)

    @torch.no_grad()
    def _view_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher logits on the augmented views: (V, B, K), batched with ghost BN for CNNs."""
        cfg = self.config
        param_gen, noise_gen = self.step_generators()
        n = cfg.n_views
        chunk = views_per_forward(cfg.views_per_forward, n, x.device)
        params = self.augment.draw(n, tuple(x.shape[-2:]), param_gen)
        grey = is_grey_rgb(x)  # once per batch, not per chunk of views
        parts = []
        for start in range(0, n, chunk):
            k = min(chunk, n - start)
            noise = self.augment.noise(k, x, noise_gen)
            views = self.augment.apply(x, params.views(start, start + k), noise, grey)
            for layer in self._teacher_bn:
                layer.ghost_groups = k
            try:
                parts.append(self.teacher(stack_views(views)).view(k, x.shape[0], -1))
            finally:
                for layer in self._teacher_bn:
                    layer.ghost_groups = 1
        return torch.cat(parts)

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        view_logits = self._view_logits(x)
        self._set_scales(augmentation_uncertainty(view_logits))
        with torch.no_grad():
            confidence = float(self.anchor(x).softmax(1).amax(1).mean())
            teacher = self.teacher(x)
            target = view_logits.mean(0) if confidence < cfg.ap else teacher
        key = "aug_target" if confidence < cfg.ap else "clean_target"
        self.counters[key] = self.counters.get(key, 0) + 1
        student = self.model(x)
        self.apply_loss(LOSSES[cfg.loss](student, target))
        self.update_teacher(cfg.ema_momentum)
        self.restore(cfg.restore_prob)
        return teacher


def warmup_adapters(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, low_rank: int = 1,
                    high_rank: int = 128, targets: tuple[str, ...] = ("qkv", "proj"), steps: int = 200,
                    batch_size: int = 64, lr: float = 1e-3, seed: int = 0, log: Any = None) -> dict[str, float]:
    """Source warm-up of ViDA's adapters: inject them into `model` (in place), freeze everything
    else, and train the branches with cross-entropy on labelled source images (float [0, 1] NCHW)
    for `steps` Adam steps. BatchNorm (CNNs) keeps its source statistics. Returns loss/accuracy of
    the last quarter of the steps."""
    if images.dim() != 4 or images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ConfigError(f"warm-up needs images (N, C, H, W) and N labels, got {tuple(images.shape)} / {tuple(labels.shape)}")
    model.eval()
    model.requires_grad_(False)
    inject_adapters(model, low_rank, high_rank, targets, seed=seed)
    names = set(adapter_parameter_names(model))
    params = [p for n, p in model.named_parameters() if n in names]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    device = params[0].device
    tail_loss, tail_correct, tail_seen = 0.0, 0, 0
    for step in range(steps):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=gen)
        xb, yb = images[idx].to(device), labels[idx].to(device)
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= steps - max(1, steps // 4):
            tail_loss += loss.item() * batch_size
            tail_correct += int((logits.argmax(1) == yb).sum())
            tail_seen += batch_size
        if log is not None and (step + 1) % max(1, steps // 10) == 0:
            log(f"warm-up step {step + 1}/{steps}: loss {loss.item():.4f}")
    model.requires_grad_(False)
    return {"loss": tail_loss / tail_seen, "accuracy": 100.0 * tail_correct / tail_seen,
            "adapter_parameters": int(sum(p.numel() for p in params)), "steps": steps}


__all__ = [
    "ViDA",
    "ViDAConv2d",
    "ViDALinear",
    "VidaConfig",
    "adapter_parameter_names",
    "inject_adapters",
    "load_adapter_weights",
    "save_adapter_weights",
    "warmup_adapters",
]

