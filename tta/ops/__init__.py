"""Public entry points of the custom ops.

Each op dispatches to the compiled kernel (`tta._C`) when it is available for the input and to the
torch reference in `tta.ops.reference` otherwise.
"""

from __future__ import annotations

import torch

from tta.ops import reference


def backend() -> str:
    """Name of the active op backend: ``"torch"`` (reference only) for now."""
    return "torch"


def bn_calibrate(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    source_weight: float,
    eps: float,
) -> torch.Tensor:
    return reference.bn_calibrate(x, running_mean, running_var, weight, bias, source_weight, eps)
