"""Source models: built-in architectures, model cards, safe checkpoint loading, source training.

`load(card_or_path)` returns a model in eval mode that takes float [0, 1] NCHW images (input
normalisation lives inside the model). Cards live in the repository's top-level `models/`:
`DEFAULT_CARD` ("resnet20-fmnist", CIFAR-style ResNet-20 with BatchNorm) and `VIT_CARD`
("vit-fmnist", timm VisionTransformer, patch 4), both trained by `tta train-source`.
"""

from tta.models.builders import build_model, list_architectures
from tta.models.cards import DEFAULT_CARD, VIT_CARD, ModelCard, get_card, list_cards, load, load_weights, models_dir
from tta.models.checkpoint import load_state_dict, save_state_dict, sha256_file
from tta.models.features import extract_features, features_and_logits
from tta.models.normalize import Normalized
from tta.models.preprocessing import get_preprocessing
from tta.models.training import cotta_threshold

__all__ = [
    "DEFAULT_CARD", "VIT_CARD", "ModelCard", "Normalized", "build_model", "cotta_threshold", "extract_features",
    "features_and_logits", "get_card", "get_preprocessing", "list_architectures", "list_cards", "load",
    "load_state_dict", "load_weights", "models_dir", "save_state_dict", "sha256_file",
]
