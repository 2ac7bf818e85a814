"""Plain-torch oracles for the entropy-family tests: a model whose logits are one BatchNorm layer
over the input features, so every loss of TENT/EATA/SAR/DeYO/ROID can be written by hand."""

from __future__ import annotations

import torch
from torch import nn


def affine_bn_model(gamma: torch.Tensor, beta: torch.Tensor) -> nn.Module:
    """logits = BatchNorm1d(features): x of shape (N, C, 1, 1) -> (N, C), gamma/beta as given."""
    bn = nn.BatchNorm1d(gamma.numel())
    with torch.no_grad():
        bn.weight.copy_(gamma)
        bn.bias.copy_(beta)
    return nn.Sequential(nn.Flatten(), bn).eval()


def bn_logits(feats: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Batch-statistics normalisation (biased variance) then the affine map, written out."""
    mean = feats.mean(0, keepdim=True)
    var = ((feats - mean) ** 2).mean(0, keepdim=True)
    return (feats - mean) / torch.sqrt(var + eps) * gamma + beta


def entropy(z: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(z, 1)
    return -(p * torch.log(p)).sum(1)


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)
