"""The adapted part of an adapter's state: everything `state_dict()` holds except the frozen source
tensors (weights adaptation never changes, shared between forks of one adapter).

Checkpoints (`CollapseGuard`) and evicted streams (`StreamPool`) keep only this part, and load it
back without writing into the frozen tensors: a copy into a shared weight, even of equal values,
bumps its autograd version counter and breaks the backward pass another stream may be running.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tta.errors import StateMismatchError


def frozen_names(adapter: nn.Module) -> set[str]:
    """State-dict keys of the adapter's frozen (shared) tensors."""
    frozen = {id(t) for t in adapter.frozen_tensors()}
    return {k for k, v in adapter.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor) and id(v) in frozen}


def adapted_state(adapter: nn.Module, frozen: set[str], clone: bool = False) -> dict[str, Any]:
    """`adapter.state_dict()` without the `frozen` keys (tensors detached; cloned with `clone`)."""
    out: dict[str, Any] = {}
    for k, v in adapter.state_dict(keep_vars=True).items():
        if k in frozen:
            continue
        if isinstance(v, torch.Tensor):
            v = v.detach().clone() if clone else v.detach()
        out[k] = v
    return out


def load_adapted(adapter: nn.Module, state: dict[str, Any], frozen: set[str], what: str = "state") -> None:
    """Load an `adapted_state` back: its keys must be exactly the adapter's non-frozen keys."""
    expected = set(adapter.state_dict(keep_vars=True)) - frozen
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise StateMismatchError(f"{what} does not fit this adapter: missing keys {missing[:5]}, "
                                 f"unexpected keys {unexpected[:5]}")
    try:
        adapter.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # wrong shapes
        raise StateMismatchError(f"{what} does not fit this adapter: {exc}") from exc


__all__ = ["adapted_state", "frozen_names", "load_adapted"]
