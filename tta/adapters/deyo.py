"""DeYO: destroy your object (Lee et al., ICLR 2024, "Entropy is not Enough for Test-Time
Adaptation: From the Perspective of Disentangled Factors").

Per batch x with logits z = f(x) and C classes:

 1. entropy filter S1: H(z_i) < ``margin`` * ln C (0.5 ln C); nothing selected: no update;
 2. x' = the S1 images with their object shape destroyed (``aug_type``): ``patch`` cuts each image
    into a ``patch_len`` x ``patch_len`` grid of patches and shuffles them (one permutation per
    image; the image is first resized to a multiple of ``patch_len`` and back, when it is not one);
    ``pixel`` permutes the pixel positions (one permutation for the batch); ``occ`` fills an
    ``occlusion_size`` square at (``row_start``, ``column_start``) with each image's channel means;
 3. pseudo-label probability difference PLPD_i = p(y_i | x_i) - p(y_i | x'_i), y_i = argmax p(. | x_i),
    with f(x') computed without gradient;
 4. PLPD filter S2: the S1 samples with PLPD > ``plpd_threshold`` (0.2); nothing selected: no update;
 5. loss = mean over S2 of w_i H(z_i), w_i = exp(e0 - H(z_i)) [reweight_ent] + exp(PLPD_i)
    [reweight_plpd], e0 = ``margin_e0`` * ln C (0.4 ln C), the weights detached; one optimizer step.
 6. the prediction is z (before the update).

Defaults and presets follow the reference library (mariodoebler/test-time-adaptation, ``DEYO`` in
``conf.py`` and ``cfgs/*/deyo.yaml``): Adam lr 1e-3 (cifar10, cifar100), SGD lr 2.5e-4 momentum 0.9
Nesterov (imagenet). As in the reference (Jhyun17/DeYO and the library's port), norm layers of the
top of the network are not adapted (``excluded``: ``layer4``, ``blocks.9``-``blocks.11``, the final
``norm``, `tta.adapters.entropy.TOP_LAYERS`), BatchNorm uses test-batch statistics (also for x',
whose batch is S1), the model is otherwise in eval mode (the library; the original code uses train
mode).

Randomness: the shuffles come from the adapter's generator on the batch's device (saved in its
state): ``patch`` draws ``torch.rand(|S1|, patch_len**2)`` and argsorts each row, ``pixel`` draws
one ``torch.randperm(H * W)``. Non-square images (the reference assumes square ones and resizes to
W x W) are resized to (H, W) multiples of ``patch_len`` and back to (H, W).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from tta.adapters.config import OptimConfig
from tta.adapters.entropy import TOP_LAYERS, NormAffineAdapter, entropy_margin, softmax_entropy
from tta.adapters.registry import register_adapter
from tta.errors import ConfigError, InvalidInputError


@dataclass
class DeyoConfig(OptimConfig):
    """DeYO options; defaults: the reference library's (CIFAR-10-C configuration).

    margin: entropy filter threshold as a fraction of ln C (0.5).
    margin_e0: entropy re-weighting offset as a fraction of ln C (0.4).
    plpd_threshold: PLPD filter threshold (0.2).
    reweight_ent / reweight_plpd: the two terms of the sample weight (both on).
    aug_type: how the object is destroyed: ``patch`` (default), ``pixel`` or ``occ``.
    patch_len: patches per side of the shuffled grid (4: 16 patches).
    occlusion_size, row_start, column_start: the ``occ`` square (the reference's ImageNet values).
    excluded: module names whose norm layers are not adapted.
    """

    margin: float = 0.5
    margin_e0: float = 0.4
    plpd_threshold: float = 0.2
    reweight_ent: bool = True
    reweight_plpd: bool = True
    aug_type: Literal["patch", "pixel", "occ"] = "patch"
    patch_len: int = 4
    occlusion_size: int = 112
    row_start: int = 56
    column_start: int = 56
    excluded: tuple[str, ...] = TOP_LAYERS

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "cifar10": {"optimizer": "adam", "lr": 1e-3},
        "cifar100": {"optimizer": "adam", "lr": 1e-3},
        "imagenet": {"optimizer": "sgd", "lr": 2.5e-4, "momentum": 0.9, "nesterov": True},
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.aug_type not in ("patch", "pixel", "occ"):
            raise ConfigError(f"aug_type must be 'patch', 'pixel' or 'occ', got {self.aug_type!r}")
        if self.patch_len < 1:
            raise ConfigError(f"patch_len must be >= 1, got {self.patch_len}")
        if self.occlusion_size < 1 or self.row_start < 0 or self.column_start < 0:
            raise ConfigError("occlusion_size must be >= 1 and row_start, column_start >= 0")
        if not (self.margin > 0 and self.margin_e0 > 0):
            raise ConfigError(f"margin and margin_e0 must be > 0, got {self.margin}, {self.margin_e0}")


def patch_shuffle(x: torch.Tensor, patch_len: int, generator: torch.Generator) -> torch.Tensor:
    """Each image of `x` (B, C, H, W) with its `patch_len` x `patch_len` grid of patches shuffled."""
    b, c, h, w = x.shape
    if h < patch_len or w < patch_len:
        raise InvalidInputError(f"deyo: images of {h}x{w} pixels cannot be cut into {patch_len}x{patch_len} patches")
    ph, pw = h // patch_len, w // patch_len
    resized = (ph * patch_len, pw * patch_len) != (h, w)
    if resized:
        x = F.interpolate(x, size=(ph * patch_len, pw * patch_len), mode="bilinear", align_corners=False, antialias=True)
    n = patch_len * patch_len
    patches = x.reshape(b, c, patch_len, ph, patch_len, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, n, c, ph, pw)
    order = torch.argsort(torch.rand(b, n, generator=generator, device=generator.device), dim=1).to(x.device)
    patches = torch.gather(patches, 1, order.view(b, n, 1, 1, 1).expand_as(patches))
    out = patches.reshape(b, patch_len, patch_len, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, ph * patch_len, pw * patch_len)
    if resized:
        out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return out


def pixel_shuffle(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`x` with its pixel positions permuted (one permutation for the whole batch)."""
    b, c, h, w = x.shape
    perm = torch.randperm(h * w, generator=generator, device=generator.device).to(x.device)
    return x.reshape(b, c, h * w)[:, :, perm].reshape(b, c, h, w)


def occlude(x: torch.Tensor, size: int, row: int, column: int) -> torch.Tensor:
    """`x` with the square [row:row+size, column:column+size] set to each image's channel means."""
    out = x.clone()
    out[:, :, row : row + size, column : column + size] = x.mean(dim=(2, 3), keepdim=True)
    return out


@register_adapter("deyo")
class DeYO(NormAffineAdapter[DeyoConfig]):
    """Entropy minimisation on samples selected by entropy and by PLPD (see the module docstring)."""

    Config = DeyoConfig

    def excluded_modules(self) -> tuple[str, ...]:
        return self.config.excluded

    def destroy(self, x: torch.Tensor) -> torch.Tensor:
        """x' of step 2: the images with their object shape destroyed."""
        cfg = self.config
        if cfg.aug_type == "patch":
            return patch_shuffle(x, cfg.patch_len, self.generator(x.device))
        if cfg.aug_type == "pixel":
            return pixel_shuffle(x, self.generator(x.device))
        return occlude(x, cfg.occlusion_size, cfg.row_start, cfg.column_start)

    @torch.enable_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        outputs = self.model(x)
        if not self.outputs_are_finite(outputs):
            return outputs.detach()
        num_classes = outputs.shape[1]
        entropy = softmax_entropy(outputs)
        keep = entropy.detach() < entropy_margin(cfg.margin, num_classes)
        n1 = int(keep.sum())
        self.counters["reliable"] = self.counters.get("reliable", 0) + n1
        if n1 == 0:
            return outputs.detach()
        with torch.no_grad():
            probs = outputs[keep].softmax(1)
            probs_destroyed = self.model(self.destroy(x[keep])).softmax(1)
            label = probs.argmax(1, keepdim=True)
            plpd = (probs.gather(1, label) - probs_destroyed.gather(1, label)).squeeze(1)
        chosen = plpd > cfg.plpd_threshold
        n2 = int(chosen.sum())
        self.counters["selected"] = self.counters.get("selected", 0) + n2
        if n2 == 0:
            return outputs.detach()
        selected_entropy = entropy[keep][chosen]
        weight = torch.ones_like(plpd[chosen])
        if cfg.reweight_ent or cfg.reweight_plpd:
            e0 = entropy_margin(cfg.margin_e0, num_classes)
            weight = (float(cfg.reweight_ent) * torch.exp(e0 - selected_entropy.detach())
                      + float(cfg.reweight_plpd) * torch.exp(plpd[chosen]))
        self.apply_loss((weight * selected_entropy).mean())
        return outputs.detach()


__all__ = ["DeYO", "DeyoConfig", "occlude", "patch_shuffle", "pixel_shuffle"]
