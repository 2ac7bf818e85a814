"""Input preprocessing presets for ImageNet-scale checkpoints (RobustBench naming).

- ``Res256Crop224``: resize the shorter side to 256 (bilinear, antialiased), centre-crop 224 - the
  standard torchvision ResNet-50 evaluation pipeline and RobustBench's ImageNet default.
- ``Crop288``: centre-crop 288 without resizing (some RobustBench ImageNet-C entries).
- ``none``: only convert to float [0, 1] (images already at the model's resolution, e.g. 32x32).

Every preset returns float32 CHW in [0, 1]; mean/std normalisation is *not* part of it because
it lives inside the loaded model (`Normalized`). ImageNet ResNet-50 cards use `IMAGENET_MEAN/STD`.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from tta.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_float() -> list[v2.Transform]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]


PRESETS = {
    "Res256Crop224": lambda: v2.Compose([v2.ToImage(), v2.Resize(256, antialias=True), v2.CenterCrop(224), v2.ToDtype(torch.float32, scale=True)]),
    "Crop288": lambda: v2.Compose([v2.ToImage(), v2.CenterCrop(288), v2.ToDtype(torch.float32, scale=True)]),
    "none": lambda: v2.Compose(_to_float()),
}


def get_preprocessing(name: str | None) -> v2.Compose:
    """Transform for one image (PIL, HWC uint8 ndarray via ToImage, or CHW uint8 tensor) or a uint8 NCHW batch."""
    key = "none" if name is None else name
    if key not in PRESETS:
        raise ConfigError(f"unknown preprocessing preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[key]()
