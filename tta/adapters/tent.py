"""TENT: fully test-time adaptation by entropy minimisation (Wang et al., ICLR 2021)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from tta.adapters.config import OptimConfig
from tta.adapters.entropy import NormAffineAdapter, softmax_entropy
from tta.adapters.registry import register_adapter


@dataclass
class TentConfig(OptimConfig):
    """Paper defaults (CIFAR): Adam lr 1e-3, betas (0.9, 0.999), batch 200, one step per batch.

    ImageNet preset: SGD lr 2.5e-4, momentum 0.9 with Nesterov (batch 64): the SGD of the reference
    ImageNet code (the CoTTA authors' and the reference CTTA library's TENT runs; TENT's own
    configuration defaults to Nesterov as well).
    """

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "cifar10": {"optimizer": "adam", "lr": 1e-3},
        "cifar100": {"optimizer": "adam", "lr": 1e-3},
        "imagenet": {"optimizer": "sgd", "lr": 2.5e-4, "momentum": 0.9, "nesterov": True},
    }


@register_adapter("tent")
class Tent(NormAffineAdapter[TentConfig]):
    """Entropy minimisation of the batch predictions; trains only normalisation affine params.

    BatchNorm layers normalise with test-batch statistics (source copy kept for reset);
    LayerNorm/GroupNorm affine parameters are trained too. The model stays in eval mode otherwise
    (no dropout or stochastic depth). The returned prediction is the one computed before the update.
    The step changes nothing before its update, so the batch's value check rides on the
    finite-loss read (no sync of its own).
    """

    Config = TentConfig
    value_check = "with_loss"

    def loss(self, outputs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return softmax_entropy(outputs).mean()


__all__ = ["Tent", "TentConfig", "softmax_entropy"]
