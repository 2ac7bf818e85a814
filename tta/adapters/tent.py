"""TENT: fully test-time adaptation by entropy minimisation (Wang et al., ICLR 2021)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from tta.adapters.base import Adapter
from tta.adapters.config import OptimConfig
from tta.adapters.registry import register_adapter
from tta.errors import NoAdaptableLayerError
from tta.layers import CalibratedBatchNorm, replace_batchnorms

NORM_TYPES = (CalibratedBatchNorm, nn.LayerNorm, nn.GroupNorm)


@dataclass
class TentConfig(OptimConfig):
    """Paper defaults (CIFAR): Adam lr 1e-3, betas (0.9, 0.999), batch 200, one step per batch.

    ImageNet preset: SGD lr 2.5e-4, momentum 0.9 (batch 64).
    """

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "cifar10": {"optimizer": "adam", "lr": 1e-3},
        "cifar100": {"optimizer": "adam", "lr": 1e-3},
        "imagenet": {"optimizer": "sgd", "lr": 2.5e-4, "momentum": 0.9},
    }


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy of softmax(logits)."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


@register_adapter("tent")
class Tent(Adapter[TentConfig]):
    """Entropy minimisation of the batch predictions; trains only normalisation affine params.

    BatchNorm layers normalise with test-batch statistics (source copy kept for reset);
    LayerNorm/GroupNorm affine parameters are trained too. The model stays in eval mode otherwise
    (no dropout or stochastic depth). The returned prediction is the one computed before the update.
    The step changes nothing before its update, so the batch's value check rides on the
    finite-loss read (no sync of its own).
    """

    Config = TentConfig
    uses_batch_stats = True
    value_check = "with_loss"

    def configure_model(self) -> None:
        self.model.eval()
        self.model.requires_grad_(False)
        replace_batchnorms(self.model, 0.0)
        self._norm_params = [
            p
            for m in self.model.modules()
            if isinstance(m, NORM_TYPES)
            for p in (m.weight, m.bias)
            if p is not None
        ]
        if not self._norm_params:
            raise NoAdaptableLayerError(
                f"tent: the model ({type(self.model).__name__}) has no normalisation layer with affine "
                "parameters (BatchNorm/LayerNorm/GroupNorm) to train"
            )
        if not any(isinstance(m, CalibratedBatchNorm) for m in self.model.modules()):
            self.uses_batch_stats = False  # LN/GN-only model
        for p in self._norm_params:
            p.requires_grad_(True)

    def collect_params(self) -> list[nn.Parameter]:
        return self._norm_params

    def loss(self, outputs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return softmax_entropy(outputs).mean()
