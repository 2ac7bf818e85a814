"""The compiled BatchNorm kernels' layout rule, in Python (mirror of `bn_layout` in csrc/ops/common.h)."""

from __future__ import annotations

import torch


def bn_channels_last_format(x: torch.Tensor) -> torch.memory_format | None:
    """The channels_last format the BN kernels keep for `x` (4-D or 5-D, dense in that format and
    not also NCHW-contiguous), else None: they work on an NCHW-contiguous copy."""
    fmt = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    if 4 <= x.dim() <= 5 and not x.is_contiguous() and x.is_contiguous(memory_format=fmt):
        return fmt
    return None
