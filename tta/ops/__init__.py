"""Public entry points of the custom ops (fused kernels with torch fallbacks).

Ops (schemas in csrc/ops/, kernels in csrc/cpu/ and csrc/cuda/, oracles in `tta.ops.reference`):

- `bn_calibrate`: BatchNorm over source/batch statistics mixed by a weight (alpha-BN; ``a=0`` is
  test-time BN), one fused pass per channel; `bn_calibrate_update_` also moves running statistics.
- `bn_calibrate_grouped`: the same per ghost group (consecutive batch slices, e.g. stacked augmented
  views), forward only.
- `knn_vote`: kNN memory lookup + softmax-weighted label vote (AdaNPC's classifier), tiled over
  the memory rows.

Every op dispatches to the compiled library `tta._C` when it is loaded and has a kernel for the
input's device (CPU always, CUDA when built with CUDA), and to the torch reference otherwise.
`backend()` names what is active. ``TTA_DISABLE_C=1`` forces the torch reference (benchmarks,
debugging). Calls that need gradients through the kNN op use the (differentiable) reference; the
BN op has a backward (C++ autograd over a fused backward kernel).
"""

from __future__ import annotations

import os

import torch

from tta.errors import InvalidInputError
from tta.ops import reference

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _load_library() -> tuple[bool, str | None]:
    if os.environ.get("TTA_DISABLE_C", "0") == "1":
        return False, "disabled by TTA_DISABLE_C=1"
    try:
        from tta import _C  # noqa: F401  (loading the library registers torch.ops.tta.*)
    except ImportError as exc:
        return False, str(exc)
    return True, None


_LOADED, LOAD_ERROR = _load_library()
if _LOADED:
    from tta.ops import _registrations  # noqa: F401  (fake kernels + autograd formulas)

_KERNEL_DEVICES: frozenset[str] = frozenset(
    ["cpu"]
    + (["cuda"] if _LOADED and torch._C._dispatch_has_kernel_for_dispatch_key("tta::knn_vote", "CUDA") else [])
    if _LOADED
    else []
)


_BN_CALIBRATE = torch.ops.tta.bn_calibrate.default if _LOADED else None
# a library built before the grouped op existed lacks it: the reference runs then
_HAS_GROUPED = _LOADED and hasattr(torch.ops.tta, "bn_calibrate_grouped")


def _as_f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def backend() -> str:
    """The active op backend: ``"cpp+cuda"``, ``"cpp"`` (compiled CPU kernels) or ``"torch"``.

    ``"torch"`` means `tta._C` is not built or not loadable (see `tta.ops.LOAD_ERROR`).
    """
    if not _LOADED:
        return "torch"
    return "cpp+cuda" if "cuda" in _KERNEL_DEVICES else "cpp"


def has_kernel(t: torch.Tensor) -> bool:
    """True when the compiled library has a kernel for tensors like `t` (device and dtype)."""
    return t.device.type in _KERNEL_DEVICES and t.dtype in _FLOAT_DTYPES


def _check_bn(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor) -> None:
    if x.dim() < 2:
        raise InvalidInputError(f"bn_calibrate: expected input (N, C, ...), got shape {tuple(x.shape)}")
    c = x.shape[1]
    if running_mean.shape != (c,) or running_var.shape != (c,):
        raise InvalidInputError(
            f"bn_calibrate: input has {c} channels but the statistics have shapes "
            f"{tuple(running_mean.shape)} / {tuple(running_var.shape)}"
        )
    if x.numel() == 0:
        raise InvalidInputError(f"bn_calibrate: empty input of shape {tuple(x.shape)}")


def bn_calibrate(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    source_weight: float,
    eps: float,
) -> torch.Tensor:
    """Normalise `x` (N, C, ...) per channel with mixed statistics, then apply the affine.

    mean = a*running_mean + (1-a)*batch_mean, var = a*running_var + (1-a)*batch_var (biased batch
    variance, fp32 accumulation), a = `source_weight`. Output dtype and memory format (NCHW or
    channels_last) follow `x`. Differentiable w.r.t. x, weight and bias.
    """
    _check_bn(x, running_mean, running_var)
    if has_kernel(x):
        # the resolved overload and no-op dtype casts skipped: this runs once per BN layer and step
        y, _, _ = _BN_CALIBRATE(
            x, _as_f32(running_mean), _as_f32(running_var), weight, bias, float(source_weight), float(eps)
        )
        return y
    return reference.bn_calibrate(x, running_mean, running_var, weight, bias, source_weight, eps)


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
    """Ghost BatchNorm: `bn_calibrate` of each of `groups` equal, consecutive batch slices (e.g. the
    stacked augmented views of one batch) on its own, in one call. Forward only.

    The compiled kernel runs on CUDA tensors (one set of launches for every group). Elsewhere, and
    with gradients required, the torch reference runs: on CPUs the teacher-student adapters feed
    one view per forward by default, so ghost groups are a GPU batching device (the CPU kernel,
    `torch.ops.tta.bn_calibrate_grouped`, exists for completeness and as a second oracle)."""
    _check_bn(x, running_mean, running_var)
    if groups < 1 or x.shape[0] % groups:
        raise InvalidInputError(f"bn_calibrate_grouped: batch of {x.shape[0]} is not divisible into {groups} groups")
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if _HAS_GROUPED and x.device.type == "cuda" and has_kernel(x) and not needs_grad:
        return torch.ops.tta.bn_calibrate_grouped(
            x, _as_f32(running_mean), _as_f32(running_var), weight, bias, float(source_weight), float(eps), int(groups)
        )
    return reference.bn_calibrate_grouped(x, running_mean, running_var, weight, bias, source_weight, eps, groups)


def bn_calibrate_update_(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    source_weight: float,
    momentum: float,
    eps: float,
) -> torch.Tensor:
    """`bn_calibrate`, and running = (1-momentum)*running + momentum*batch, in place.

    The output mixes with the running statistics as they were before the update; the running
    variance moves towards the unbiased batch variance (PyTorch's convention). The running
    statistics must be fp32 and contiguous. With gradients required, the torch reference runs.
    """
    _check_bn(x, running_mean, running_var)
    if not (0.0 <= momentum <= 1.0):
        raise InvalidInputError(f"bn_calibrate_update_: momentum must be in [0, 1], got {momentum}")
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias)
    )
    if has_kernel(x) and not needs_grad:
        y, _, _ = torch.ops.tta.bn_calibrate_update(
            x, running_mean, running_var, weight, bias, float(source_weight), float(momentum), float(eps)
        )
        return y
    return reference.bn_calibrate_update_(
        x, running_mean, running_var, weight, bias, source_weight, momentum, eps
    )[0]


KNN_METRICS = ("cosine", "ip", "l2")
KNN_MAX_K = 256


def knn_vote(
    queries: torch.Tensor,
    memory: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    k: int,
    temperature: float,
    metric: str = "cosine",
    return_neighbors: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class scores (B, C) of a softmax(similarity / temperature)-weighted vote of the top-k rows.

    queries (B, D) and memory (M, D) in fp32/fp16/bf16 (fp16 storage is read tile by tile in
    fp32), labels (M,) int64 in [0, num_classes). metric: ``"cosine"``, ``"ip"`` (inner product:
    use it when rows are L2-normalised at insert) or ``"l2"`` (similarity = -squared distance).
    k <= 256; when k > M every row votes. With `return_neighbors`, also returns the neighbour
    indices (B, k) and similarities (B, k), sorted by decreasing similarity, padded with -1/-inf.
    """
    if queries.dim() != 2 or memory.dim() != 2 or queries.shape[1] != memory.shape[1]:
        raise InvalidInputError(
            f"knn_vote: expected queries (B, D) and memory (M, D), got {tuple(queries.shape)} and "
            f"{tuple(memory.shape)}"
        )
    if labels.shape != (memory.shape[0],) or labels.dtype != torch.int64:
        raise InvalidInputError(
            f"knn_vote: labels must be int64 of shape ({memory.shape[0]},), got {labels.dtype} "
            f"{tuple(labels.shape)}"
        )
    if metric not in KNN_METRICS:
        raise InvalidInputError(f"knn_vote: metric must be one of {KNN_METRICS}, got {metric!r}")
    if not 1 <= k <= KNN_MAX_K:
        raise InvalidInputError(f"knn_vote: k must be in [1, {KNN_MAX_K}], got {k}")
    if not temperature > 0:
        raise InvalidInputError(f"knn_vote: temperature must be > 0, got {temperature}")
    needs_grad = torch.is_grad_enabled() and (queries.requires_grad or memory.requires_grad)
    if has_kernel(queries) and memory.dtype in _FLOAT_DTYPES and not needs_grad:
        out = torch.ops.tta.knn_vote(queries, memory, labels, int(num_classes), int(k), float(temperature), metric)
    else:
        out = reference.knn_vote(queries, memory, labels, num_classes, k, temperature, metric)
    return out if return_neighbors else out[0]


__all__ = [
    "KNN_MAX_K",
    "KNN_METRICS",
    "LOAD_ERROR",
    "backend",
    "bn_calibrate",
    "bn_calibrate_update_",
    "has_kernel",
    "knn_vote",
    "reference",
]
