"""Pooled penultimate features ("pre-logits") for feature-based adapters (AdaNPC) and export.

Resolution order for a model (a `Normalized` wrapper is looked through, normalisation applied):
1. an explicit `layer` that names a module (the classifier): its *input* is the feature (hooked);
   a card's `feature_layer` is passed as `layer`; the method names in `AUTO_LAYERS` mean "automatic";
2. timm models: `forward_head(forward_features(x), pre_logits=True)`;
3. built-ins (`CifarResNet`, `WideResNet`): `forward_features(x)` (already pooled);
4. anything else (torchvision...): the input of the last `nn.Linear` registered in the model.
"""

from __future__ import annotations

import torch
from torch import nn

from tta.errors import NoAdaptableLayerError
from tta.models.normalize import Normalized


# Card values meaning "use the model's own feature API" (rules 2-3 below / above).
PRE_LOGITS = "forward_head(pre_logits=True)"
FORWARD_FEATURES = "forward_features"
AUTO_LAYERS = frozenset({"auto", PRE_LOGITS, FORWARD_FEATURES, "forward_head(forward_features(x), pre_logits=True)"})


def default_feature_layer(net: nn.Module) -> str:
    """The value a model card records in `feature_layer` for `net`."""
    if hasattr(net, "forward_head") and hasattr(net, "forward_features"):
        return PRE_LOGITS
    if hasattr(net, "forward_features") and hasattr(net, "fc"):
        return FORWARD_FEATURES
    return classifier_name(net)


def _unwrap(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    if isinstance(model, Normalized):
        return model.model, model.normalize(x)
    return model, x


def classifier_name(model: nn.Module) -> str:
    """Name of the last `nn.Linear` in `model` (the classifier of timm/torchvision/built-in models)."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise NoAdaptableLayerError(f"{type(model).__name__} has no nn.Linear classifier to take features from")
    return names[-1]


def _hooked(net: nn.Module, x: torch.Tensor, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        head = net.get_submodule(layer)
    except AttributeError as exc:
        raise NoAdaptableLayerError(f"{type(net).__name__} has no module named {layer!r}") from exc
    captured: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        logits = net(x)
    finally:
        handle.remove()
    return torch.flatten(captured[-1], 1), logits


def features_and_logits(model: nn.Module, x: torch.Tensor, layer: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled features (N, D), logits (N, K)) from one forward pass."""
    net, x = _unwrap(model, x)
    if layer is not None and layer not in AUTO_LAYERS:
        return _hooked(net, x, layer)
    if hasattr(net, "forward_head") and hasattr(net, "forward_features"):  # timm
        tokens = net.forward_features(x)
        return net.forward_head(tokens, pre_logits=True), net.forward_head(tokens)
    if hasattr(net, "forward_features") and hasattr(net, "fc"):  # built-in CIFAR ResNet / WideResNet
        feats = net.forward_features(x)
        return feats, net.fc(feats)
    return _hooked(net, x, classifier_name(net))


def extract_features(model: nn.Module, x: torch.Tensor, layer: str | None = None) -> torch.Tensor:
    """Pooled penultimate features (N, D) of `model` for [0, 1] inputs `x`."""
    return features_and_logits(model, x, layer)[0]
