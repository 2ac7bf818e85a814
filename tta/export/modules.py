"""Export-time stand-ins: modules that compute the same math as the runtime's layers with ops every
ONNX consumer (onnxruntime CPU/CUDA, TensorRT) accepts.

`CalibratedBatchNorm` with ``source_weight == 0`` calls ``F.batch_norm(training=True)``, which
exports as a training-mode ``BatchNormalization`` node that onnxruntime's CUDA provider and TensorRT
reject. `ExportableCalibratedBatchNorm` spells the same computation out with primitive ops
(ReduceMean, Sub, Mul, Sqrt, Div, Add) so the whole alpha-BN model is one static graph.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from tta.errors import NoAdaptableLayerError
from tta.layers import CalibratedBatchNorm


class ExportableCalibratedBatchNorm(nn.Module):
    """alpha-BN (You et al. 2021) with in-graph batch statistics.

    mean = a*mu_src + (1-a)*mu_batch, var = a*var_src + (1-a)*var_batch (biased batch variance,
    as `tta.layers.CalibratedBatchNorm`). A batch of one image is normalised with the source
    statistics (a = 1), computed in-graph from the batch size, which is what the runtime's
    ``small_batch="source"`` policy does; the edge runtime raises before running the graph when
    ``small_batch="raise"``.
    """

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None, running_mean: torch.Tensor,
                 running_var: torch.Tensor, eps: float, source_weight: float, post: nn.Module | None = None) -> None:
        super().__init__()
        c = running_mean.numel()
        self.register_buffer("weight", (weight if weight is not None else torch.ones(c)).detach().float().clone())
        self.register_buffer("bias", (bias if bias is not None else torch.zeros(c)).detach().float().clone())
        self.register_buffer("running_mean", running_mean.detach().float().clone())
        self.register_buffer("running_var", running_var.detach().float().clone())
        self.eps = float(eps)
        self.source_weight = float(source_weight)
        self.post = post if post is not None else nn.Identity()

    @classmethod
    def from_layer(cls, layer: nn.Module, source_weight: float) -> "ExportableCalibratedBatchNorm":
        if layer.running_mean is None or layer.running_var is None:
            raise NoAdaptableLayerError(
                f"{type(layer).__name__} has no running statistics (track_running_stats=False); alpha-BN "
                "needs the source statistics"
            )
        post = getattr(layer, "post", None)
        if post is None and hasattr(layer, "act") and hasattr(layer, "drop"):  # timm BatchNormAct2d
            post = nn.Sequential(layer.drop, layer.act)
        return cls(layer.weight, layer.bias, layer.running_mean, layer.running_var, layer.eps, source_weight, post)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        mean = x.mean(dim=dims, keepdim=True)
        centered = x - mean
        var = (centered * centered).mean(dim=dims, keepdim=True)
        # One image: source statistics (a = 1). The batch size stays symbolic on a dynamic axis.
        a = torch.where(x.new_ones(()) * x.shape[0] >= 2, self.source_weight, 1.0)
        mean = a * self.running_mean.view(shape) + (1 - a) * mean
        var = a * self.running_var.view(shape) + (1 - a) * var
        scale = self.weight.view(shape) / torch.sqrt(var + self.eps)
        return self.post((x - mean) * scale + self.bias.view(shape))


def to_alpha_bn(model: nn.Module, source_weight: float) -> int:
    """Replace every BatchNorm / CalibratedBatchNorm in `model` (in place); return how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (nn.modules.batchnorm._BatchNorm, CalibratedBatchNorm)):
                setattr(parent, name, ExportableCalibratedBatchNorm.from_layer(child, source_weight))
                count += 1
    if count == 0:
        raise NoAdaptableLayerError(
            f"{type(model).__name__} has no BatchNorm layer: an alpha-bn export needs one "
            "(export mode 'frozen' or 'features' instead)"
        )
    return count


class _AnyRankBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Eval-mode BatchNorm for (N, C, ...) inputs of any rank, as CalibratedBatchNorm accepts."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected input of rank >= 2, got shape {tuple(input.shape)}")


def to_source_batchnorm(model: nn.Module) -> None:
    """Turn CalibratedBatchNorm layers (a model taken from an adapter) back into eval-mode BatchNorm
    with the source statistics, so the exporter folds them into the convolutions."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, CalibratedBatchNorm):
                bn = _AnyRankBatchNorm(child.num_features, eps=child.eps, affine=child.weight is not None)
                with torch.no_grad():
                    if child.weight is not None:
                        bn.weight.copy_(child.weight)
                        bn.bias.copy_(child.bias)
                    bn.running_mean.copy_(child.running_mean)
                    bn.running_var.copy_(child.running_var)
                bn.eval()
                replacement: nn.Module = bn if isinstance(child.post, nn.Identity) else nn.Sequential(bn, child.post)
                setattr(parent, name, replacement)


def feature_function(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Pooled penultimate features of `model` (N, D): `tta.models.features.extract_features`, the
    same function the AdaNPC adapter reads its features with (timm pre-logits, built-in pooled
    ``forward_features``, else the input of the last Linear)."""
    from tta.models.features import extract_features

    return lambda x: extract_features(model, x)


class FeatureExtractor(nn.Module):
    """`model` truncated to its pooled penultimate features."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._fn = feature_function(model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x)


def prepared_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).cpu().float().eval().requires_grad_(False)
