"""Normalisation layers the adapters put in place of a model's BatchNorm layers.

`CalibratedBatchNorm` normalises with a mix of the stored source statistics and the statistics of
the current test batch:

    mean = a * mean_source + (1 - a) * mean_batch
    var  = a * var_source  + (1 - a) * var_batch          (a = ``source_weight``)

``a = 0`` is test-time normalisation (BN adapter, TENT, CoTTA), ``a = 1`` is the source model, values
in between are alpha-BN (You et al. 2021). The batch variance is the *biased* estimate (what
PyTorch's BatchNorm normalises with in training mode); the source variance is PyTorch's stored
running variance (unbiased), exactly as a source model in eval mode uses it.

``ghost_groups = G`` splits the batch into G equal chunks and normalises each with its own batch
statistics, so one forward over G stacked views equals G separate forwards (CoTTA's batched
augmentation views); `tta.ops.bn_calibrate_grouped` does it in one call (a compiled kernel on GPUs).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from tta import ops
from tta.errors import BatchTooSmallError, NoAdaptableLayerError
from tta.ops._layout import bn_channels_last_format


def _op_beats_native_batch_stats(x: torch.Tensor) -> bool:
    """Whether `tta.ops.bn_calibrate` with source weight 0 is the faster way to normalise `x` with
    its batch statistics: yes where it has a kernel, except channels_last input on the CPU, where
    PyTorch's native NHWC batch norm measured faster (BENCHMARKS.md, "Kernels on the CPU")."""
    if not ops.has_kernel(x):
        return False
    return not (x.device.type == "cpu" and x.dim() == 4 and bn_channels_last_format(x) is not None)


class CalibratedBatchNorm(nn.Module):
    """BatchNorm over mixed source/test-batch statistics; a drop-in for `nn.BatchNorm{1,2,3}d`.

    Keeps the original parameter and buffer names (``weight``, ``bias``, ``running_mean``,
    ``running_var``) so state-dict keys of the model do not change. ``post`` holds what a fused
    norm+activation layer (timm ``BatchNormAct2d``) applies after normalising.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        affine: bool = True,
        source_weight: float = 0.0,
        post: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.source_weight = float(source_weight)
        self.ghost_groups = 1
        self.use_source_stats = False  # set by `source_statistics()` for the small-batch fallback
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.post = post if post is not None else nn.Identity()

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm, source_weight: float) -> "CalibratedBatchNorm":
        if bn.running_mean is None or bn.running_var is None:
            if source_weight > 0:
                raise NoAdaptableLayerError(
                    f"{type(bn).__name__} has no running statistics (track_running_stats=False): "
                    "source statistics are needed for source_weight > 0"
                )
        post = None
        if hasattr(bn, "act") and hasattr(bn, "drop"):  # timm BatchNormAct2d: bn -> drop -> act
            post = nn.Sequential(bn.drop, bn.act)
        layer = cls(bn.num_features, bn.eps, bn.affine, source_weight, post)
        device = bn.weight.device if bn.weight is not None else None
        layer.to(device)
        with torch.no_grad():
            if bn.affine:
                layer.weight.copy_(bn.weight)
                layer.bias.copy_(bn.bias)
                layer.weight.requires_grad_(bn.weight.requires_grad)
                layer.bias.requires_grad_(bn.bias.requires_grad)
            if bn.running_mean is not None:
                layer.running_mean = bn.running_mean.detach().clone().float()
                layer.running_var = bn.running_var.detach().clone().float()
        return layer

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, source_weight={self.source_weight}, "
            f"ghost_groups={self.ghost_groups}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}: expected input with {self.num_features} channels in dim 1, "
                f"got shape {tuple(x.shape)}"
            )
        a = 1.0 if self.use_source_stats else self.source_weight
        if a >= 1.0:
            y = F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        elif self.ghost_groups > 1:
            y = self._ghost_forward(x, a)
        else:
            _check_batch_size(x, 1)
            if a == 0.0 and not _op_beats_native_batch_stats(x):
                # Pure batch statistics: PyTorch's training-mode kernel, where the compiled op is
                # missing or measured slower (bench/bench_ops.py, BENCHMARKS.md).
                y = F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
            else:
                # Compiled kernel when available for this input, else the torch composite (the oracle).
                y = ops.bn_calibrate(x, self.running_mean, self.running_var, self.weight, self.bias, a, self.eps)
        return self.post(y)

    def _ghost_forward(self, x: torch.Tensor, a: float) -> torch.Tensor:
        g = self.ghost_groups
        if x.shape[0] % g:
            raise ValueError(f"batch of {x.shape[0]} is not divisible into {g} ghost groups")
        _check_batch_size(x, g)
        # one call for all groups: the compiled kernel (per-(group, channel) statistics in one set
        # of launches) or the torch reference (var_mean over each group + one addcmul)
        return ops.bn_calibrate_grouped(x, self.running_mean, self.running_var, self.weight, self.bias, a, self.eps, g)


def _check_batch_size(x: torch.Tensor, groups: int) -> None:
    values_per_channel = x.numel() // max(x.shape[1], 1) // groups
    if values_per_channel < 2:
        raise BatchTooSmallError(
            f"batch statistics need more than one value per channel; got input of shape "
            f"{tuple(x.shape)}"
            + (f" in {groups} ghost groups" if groups > 1 else "")
            + ". Use a larger batch (the frame micro-batcher groups frames), alpha-bn with "
            "source_weight > 0, or small_batch='source'."
        )


def replace_batchnorms(model: nn.Module, source_weight: float) -> list[CalibratedBatchNorm]:
    """Swap every `_BatchNorm` in `model` (in place) for a `CalibratedBatchNorm`; return them."""
    replaced: list[CalibratedBatchNorm] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                layer = CalibratedBatchNorm.from_batchnorm(child, source_weight)
                setattr(parent, name, layer)
                replaced.append(layer)
            elif isinstance(child, CalibratedBatchNorm):
                child.source_weight = float(source_weight)
                replaced.append(child)
    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        raise NoAdaptableLayerError("the model is a bare BatchNorm layer; wrap it in a module")
    return replaced


def calibrated_layers(model: nn.Module) -> list[CalibratedBatchNorm]:
    return [m for m in model.modules() if isinstance(m, CalibratedBatchNorm)]


@contextmanager
def source_statistics(model: nn.Module) -> Iterator[None]:
    """Temporarily normalise every `CalibratedBatchNorm` in `model` with its source statistics."""
    layers = calibrated_layers(model)
    previous = [layer.use_source_stats for layer in layers]
    for layer in layers:
        layer.use_source_stats = True
    try:
        yield
    finally:
        for layer, prev in zip(layers, previous):
            layer.use_source_stats = prev


def set_ghost_groups(model: nn.Module, groups: int) -> None:
    for layer in calibrated_layers(model):
        layer.ghost_groups = groups


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.modules.batchnorm._BatchNorm, CalibratedBatchNorm)) for m in model.modules())
