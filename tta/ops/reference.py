"""Pure-torch reference implementations of the ops: the fallback and the test oracles."""

from __future__ import annotations

import torch


def bn_calibrate(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    source_weight: float,
    eps: float,
) -> torch.Tensor:
    """BatchNorm with source/batch statistics mixed by `source_weight` (biased batch variance)."""
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    xf = x.float()
    var, mean = torch.var_mean(xf, dim=dims, unbiased=False)
    a = float(source_weight)
    mean = a * running_mean.float() + (1.0 - a) * mean
    var = a * running_var.float() + (1.0 - a) * var
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.float()
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.float()
    return (xf * scale.view(shape) + shift.view(shape)).to(x.dtype)
