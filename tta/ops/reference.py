"""Pure-torch reference implementations of the ops: the fallback backend and the test oracles.

Each function has exactly the contract of its compiled twin in csrc/ (same arguments, same
outputs, fp32 statistics/scores), written for clarity with torch operators.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: rows of the memory scored at once by the kNN reference (bounds the B x tile block)
KNN_TILE = 65536
_NORM_EPS = 1e-12


def _channel_view(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.view([1, -1] + [1] * (dim - 2))


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
    return bn_calibrate_stats(x, running_mean, running_var, weight, bias, source_weight, eps)[0]


def bn_calibrate_stats(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    source_weight: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`bn_calibrate` returning ``(y, batch_mean, batch_var)`` like ``torch.ops.tta.bn_calibrate``.

    y = (x - m) * rsqrt(v + eps) * weight + bias with m = a*running_mean + (1-a)*batch_mean and
    v = a*running_var + (1-a)*batch_var (biased), a = source_weight; statistics in fp32.
    """
    dims = [0] + list(range(2, x.dim()))
    xf = x.float()
    var, mean = torch.var_mean(xf, dim=dims, unbiased=False)
    a = float(source_weight)
    mixed_mean = a * running_mean.float() + (1.0 - a) * mean
    mixed_var = a * running_var.float() + (1.0 - a) * var
    scale = torch.rsqrt(mixed_var + eps)
    if weight is not None:
        scale = scale * weight.float()
    shift = -mixed_mean * scale
    if bias is not None:
        shift = shift + bias.float()
    y = xf * _channel_view(scale, x.dim()) + _channel_view(shift, x.dim())
    return y.to(x.dtype), mean, var


def bn_calibrate_grouped(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    source_weight: float,
    eps: float,
    groups: int,
) -> torch.Tensor:
    """Ghost BatchNorm: `bn_calibrate` of each of `groups` equal, consecutive batch slices on its own.

    Statistics per (group, channel) in fp32; normalisation and affine folded into one scale and
    shift per (group, channel) (one addcmul over the big tensor); output in x's dtype.
    """
    if groups < 1 or x.shape[0] % groups:
        raise ValueError(f"batch of {x.shape[0]} is not divisible into {groups} groups")
    xg = x.reshape(groups, x.shape[0] // groups, *x.shape[1:]).float()
    dims = [1] + list(range(3, xg.dim()))
    var, mean = torch.var_mean(xg, dim=dims, unbiased=False, keepdim=True)
    shape = [1, 1, -1] + [1] * (xg.dim() - 3)
    a = float(source_weight)
    if a > 0.0:
        mean = a * running_mean.view(shape) + (1 - a) * mean
        var = a * running_var.view(shape) + (1 - a) * var
    scale = torch.rsqrt(var + eps)
    shift = -mean * scale
    if weight is not None:
        scale = scale * weight.float().view(shape)
        shift = shift * weight.float().view(shape)
    if bias is not None:
        shift = shift + bias.float().view(shape)
    # fp32 arithmetic, one rounding to x's dtype (under autocast the activation stays bf16/fp16)
    return torch.addcmul(shift, xg, scale).reshape(x.shape).to(x.dtype)


def bn_calibrate_update_(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    source_weight: float,
    momentum: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`bn_calibrate_stats`, then running = (1-momentum)*running + momentum*batch (in place).

    The output mixes with the running statistics as they were *before* the update; the running
    variance moves towards the unbiased batch variance (PyTorch's BatchNorm convention).
    """
    y, mean, var = bn_calibrate_stats(x, running_mean, running_var, weight, bias, source_weight, eps)
    n = x.numel() // x.shape[1]
    unbiased = var * (n / (n - 1)) if n > 1 else var
    with torch.no_grad():
        running_mean.mul_(1.0 - momentum).add_(mean.detach(), alpha=momentum)
        running_var.mul_(1.0 - momentum).add_(unbiased.detach(), alpha=momentum)
    return y, mean, var


def knn_vote(
    queries: torch.Tensor,
    memory: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    k: int,
    temperature: float,
    metric: str = "cosine",
    tile: int = KNN_TILE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """kNN lookup + softmax label vote; returns ``(scores (B, C), indices (B, k), sims (B, k))``.

    Similarity: cosine (both sides normalised), ``"ip"`` (inner product) or ``"l2"`` (minus the
    squared distance). The memory is scanned in tiles of `tile` rows, merging a running top-k, so
    memory use is O(B * (tile + k)) for any M. Neighbours are sorted by decreasing similarity;
    when k > M the tail holds index -1 and similarity -inf. scores[b] = sum over the neighbours of
    softmax(sim / temperature) * onehot(label); all outputs fp32 / int64.
    """
    if metric not in ("cosine", "ip", "l2"):
        raise ValueError(f"knn_vote: metric must be 'cosine', 'ip' or 'l2', got {metric!r}")
    q = queries.float()
    B, M = q.shape[0], memory.shape[0]
    kk = min(k, M)
    q_sq = q.square().sum(1, keepdim=True)
    if metric == "cosine":
        q = q / q_sq.sqrt().clamp_min(_NORM_EPS)
    best_v = q.new_empty((B, 0))
    best_i = torch.empty((B, 0), dtype=torch.long, device=q.device)
    for start in range(0, M, tile):
        block = memory[start : start + tile].float()
        sims = q @ block.T
        if metric == "cosine":
            sims = sims / block.norm(dim=1).clamp_min(_NORM_EPS)
        elif metric == "l2":
            sims = 2 * sims - q_sq - block.square().sum(1)
        idx = torch.arange(start, start + block.shape[0], device=q.device).expand(B, -1)
        cand_v = torch.cat([best_v, sims], dim=1)
        cand_i = torch.cat([best_i, idx], dim=1)
        best_v, pos = cand_v.topk(kk, dim=1)
        best_i = cand_i.gather(1, pos)
    scores = q.new_zeros((B, num_classes))
    if kk > 0:
        weights = torch.softmax(best_v / temperature, dim=1)
        scores.scatter_add_(1, labels[best_i], weights)
    pad = k - kk
    if pad:
        best_v = torch.cat([best_v, best_v.new_full((B, pad), float("-inf"))], dim=1)
        best_i = torch.cat([best_i, best_i.new_full((B, pad), -1)], dim=1)
    return scores, best_i, best_v
