"""Architecture factory: built-in CIFAR-size networks, any timm model, any torchvision model.

Names: `resnet20` (CIFAR ResNet-20), `wrn28_10` (RobustBench "Standard" WideResNet-28-10),
`vit_patch4_32` (timm VisionTransformer for 32x32 inputs, patch 4), `timm:<name>`,
`torchvision:<name>`, a user's factory `package.module:factory` or the name of a ``tta.models``
entry point (`tta.plugins`), called as ``factory(num_classes=, in_chans=, **arch_kwargs)``; a bare
unknown name is tried as a timm model.

`pretrained=True` downloads weights and therefore needs the network; offline
(``HF_HUB_OFFLINE=1`` or the hub host unreachable within a few seconds) it raises
`DataNotFoundError` at once instead of letting the hub client retry. Use a local weights file
(`tta.models.load_weights` / a model card) for offline deployments.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from typing import Any

import timm
import torchvision
from torch import nn

from tta.errors import ConfigError, DataNotFoundError
from tta.models.resnet_cifar import resnet20
from tta.models.wide_resnet import wrn28_10

OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TTA_OFFLINE")
_PROBE_TIMEOUT_S = 3.0


def vit_patch4_32(num_classes: int = 10, in_chans: int = 3, embed_dim: int = 128, depth: int = 6,
                  num_heads: int = 4, mlp_ratio: float = 2.0, **kwargs: Any) -> nn.Module:
    """timm `VisionTransformer` for 32x32 images with 4x4 patches (64 tokens + class token)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=4, in_chans=in_chans, num_classes=num_classes,
                             embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, **kwargs)


BUILTINS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "wrn28_10": wrn28_10,
    "vit_patch4_32": vit_patch4_32,
}


def list_architectures() -> list[str]:
    return sorted(BUILTINS)


def _offline_flag() -> str | None:
    for var in OFFLINE_ENV:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return var
    return None


def _reachable(host: str, port: int = 443, timeout: float = _PROBE_TIMEOUT_S) -> bool:
    """TCP connect with a hard deadline; DNS runs in a daemon thread because getaddrinfo has no timeout."""
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def require_download(what: str, host: str) -> None:
    """Raise `DataNotFoundError` now if `what` would have to be downloaded from `host` but cannot."""
    flag = _offline_flag()
    if flag is not None:
        reason = f"{flag} is set"
    elif not _reachable(host):
        reason = f"{host} is not reachable"
    else:
        return
    raise DataNotFoundError(
        f"pretrained weights for {what} need a download from {host}, but {reason}. "
        "Download the weights on a connected machine and load them from a local file "
        "(tta.models.load_weights(arch, path) or a model card with `checkpoint:`)"
    )


def build_model(arch: str, num_classes: int = 10, in_chans: int = 3, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Instantiate `arch` with random weights (or hub weights when `pretrained`, online only)."""
    if not isinstance(arch, str) or not arch:
        raise ConfigError(f"architecture must be a non-empty string, got {arch!r}")
    if arch in BUILTINS:
        if pretrained:
            raise ConfigError(f"built-in architecture {arch!r} has no downloadable weights; load a checkpoint file instead")
        return BUILTINS[arch](num_classes=num_classes, in_chans=in_chans, **kwargs)
    from tta.plugins import import_factory, model_builder

    source, sep, name = arch.partition(":")
    if sep and source not in ("timm", "torchvision"):
        factory = import_factory(arch, f"architecture {arch!r}")  # package.module:factory
    else:
        factory = None if sep else model_builder(arch)  # a `tta.models` entry point
    if factory is not None:
        if pretrained:
            raise ConfigError(f"architecture {arch!r} is a user factory: load its weights from a checkpoint file")
        try:
            model = factory(num_classes=num_classes, in_chans=in_chans, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the user's factory; its error becomes one line
            raise ConfigError(f"architecture {arch!r}: factory(num_classes={num_classes}, in_chans={in_chans}"
                              f"{', **arch_kwargs' if kwargs else ''}) failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(model, nn.Module):
            raise ConfigError(f"architecture {arch!r} returned {type(model).__name__}, not a torch.nn.Module")
        return model
    if not sep:
        source, name = "timm", arch
    if source == "timm":
        if not timm.is_model(name):
            raise ConfigError(f"unknown architecture {arch!r}: not built in ({', '.join(BUILTINS)}) and not a timm model")
        if pretrained:
            require_download(f"timm model {name!r}", "huggingface.co")
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if source == "torchvision":
        if name not in torchvision.models.list_models():
            raise ConfigError(f"unknown torchvision architecture {name!r}")
        if in_chans != 3:
            raise ConfigError(f"torchvision models take 3 input channels, got in_chans={in_chans}")
        if pretrained:
            require_download(f"torchvision model {name!r}", "download.pytorch.org")
            weights = torchvision.models.get_model_weights(name).DEFAULT
            model = torchvision.models.get_model(name, weights=weights, **kwargs)
            if num_classes != len(weights.meta["categories"]):
                raise ConfigError(f"pretrained {name} has {len(weights.meta['categories'])} classes, asked for {num_classes}")
            return model
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    raise ConfigError(f"unknown architecture source {source!r} in {arch!r}; use timm:<name> or torchvision:<name>")
