"""Source models: built-in architectures, model cards, safe checkpoint loading, source training.

`load(card_or_path)` returns a model in eval mode that takes float [0, 1] NCHW images (input
normalisation lives inside the model). Cards are found by name in the search order of `tta.paths`;
two ship with the package: `DEFAULT_CARD` ("resnet20-fmnist", CIFAR-style ResNet-20 with BatchNorm)
and `VIT_CARD` ("vit-fmnist", timm VisionTransformer, patch 4), both trained by `tta train-source`.

Names are imported on first use (PEP 562): reading cards (`get_card`, `list_cards`) needs neither
torch nor timm.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_model": "builders", "list_architectures": "builders",
    "DEFAULT_CARD": "cards", "VIT_CARD": "cards", "ModelCard": "cards", "card_entries": "cards",
    "get_card": "cards", "list_cards": "cards", "load": "cards", "load_weights": "cards",
    "load_state_dict": "checkpoint", "save_state_dict": "checkpoint", "sha256_file": "checkpoint",
    "extract_features": "features", "features_and_logits": "features",
    "Normalized": "normalize",
    "get_preprocessing": "preprocessing",
    "cotta_threshold": "training",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"tta.models.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tta.models' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
