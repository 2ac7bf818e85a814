"""Input normalisation inside the model, so every loaded model takes float [0, 1] NCHW images
(the RobustBench convention) and adapters never see normalised tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Normalized(nn.Module):
    """`model((x - mean) / std)` with per-channel `mean`/`std` stored as non-trainable buffers.

    The wrapped network is `self.model`, so state-dict keys read `model.<key>` plus `mean`/`std`.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"mean/std must have the same length and std > 0, got {mean} / {std}")
        self.model = model
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))
