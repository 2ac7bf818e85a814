"""Gradient-free baselines: Source, BN (test-time normalisation) and alpha-BN."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import torch

from tta.adapters.base import Adapter
from tta.adapters.config import AdapterConfig
from tta.adapters.registry import register_adapter
from tta.errors import ConfigError, NoAdaptableLayerError
from tta.layers import has_batchnorm, replace_batchnorms


@register_adapter("source")
class Source(Adapter[AdapterConfig]):
    """The frozen source model in eval mode: the baseline every table starts with."""

    value_check = "after_forward"  # keeps no state between batches

    def configure_model(self) -> None:
        self.model.eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


@dataclass
class AlphaBNConfig(AdapterConfig):
    """source_weight: weight `a` of the source statistics, mean = a*mu_src + (1-a)*mu_batch.

    Default 0.9 (0.1 on the test batch), the convention of the public `BNAlpha` peer
    implementation; You et al. (2021) could not be confirmed on the convention. The batch variance
    is the biased estimate (PyTorch's training-mode normalisation).
    """

    source_weight: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.source_weight <= 1.0:
            raise ConfigError(f"source_weight must be in [0, 1], got {self.source_weight}")


BC = TypeVar("BC", bound=AdapterConfig)


class _BatchStatsAdapter(Adapter[BC]):
    """Shared set-up: every BatchNorm normalises with (mixed) test-batch statistics; no training.

    Nothing persists between batches, so the value check is read after the forward is queued.
    """

    uses_batch_stats = True
    value_check = "after_forward"

    def _source_weight(self) -> float:
        return 0.0

    def configure_model(self) -> None:
        if not has_batchnorm(self.model):
            raise NoAdaptableLayerError(
                f"{self.name}: the model has no BatchNorm layer to recalibrate "
                f"({type(self.model).__name__}); use 'tent' for LayerNorm/GroupNorm models"
            )
        self.model.eval()
        self.model.requires_grad_(False)
        replace_batchnorms(self.model, self._source_weight())

    @torch.no_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


@register_adapter("bn")
class BN(_BatchStatsAdapter[AdapterConfig]):
    """Test-time normalisation ("BN-1", Schneider et al. 2020; Nado et al. 2020).

    Every BatchNorm layer normalises with the statistics of the current test batch; nothing is
    trained and nothing accumulates, so the adapter is stateless across batches. The source
    statistics stay in the layers' ``running_mean``/``running_var`` buffers.
    """


@register_adapter("alpha-bn")
class AlphaBN(_BatchStatsAdapter[AlphaBNConfig]):
    """alpha-BN (You, Li, Zhao 2021): normalise with a*source + (1-a)*batch statistics.

    ``source_weight=1`` is the source model, ``source_weight=0`` is the BN adapter. Stateless per
    batch, so the whole adapted model is a static graph (exportable to ONNX/TensorRT).
    """

    Config = AlphaBNConfig

    def _source_weight(self) -> float:
        return self.config.source_weight
