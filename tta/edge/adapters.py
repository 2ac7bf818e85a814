"""Gradient-free adapters on an exported graph: the source model and alpha-BN (in-graph).

Both are stateless across batches (alpha-BN's statistics live in the graph), so their state is the
counters only; AdaNPC (`tta.edge.adanpc`) keeps a memory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from tta.edge.errors import MetadataError
from tta.edge.model import EdgeModel
from tta.errors import BatchTooSmallError, ConfigError


class EdgeAdapter:
    """Predict-and-adapt on numpy batches with an exported model. `adapter(x)` returns the prediction."""

    name: ClassVar[str] = ""
    mode: ClassVar[str] = ""
    output_kind: ClassVar[str] = "logits"

    def __init__(self, model: EdgeModel | str | os.PathLike[str], providers: str | list[str] = "auto") -> None:
        self.model = model if isinstance(model, EdgeModel) else EdgeModel(model, providers)
        if self.model.metadata.mode != self.mode:
            raise MetadataError(
                f"edge adapter {self.name!r} needs a {self.mode!r} export; {self.model.path} is a "
                f"{self.model.metadata.mode!r} export (`tta export onnx --mode {self.mode}`)"
            )
        self.counters = {"batches": 0, "small_batches": 0}

    @property
    def metadata(self):  # noqa: ANN201 - ExportMetadata
        return self.model.metadata

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = self.forward(self.model.validate_batch(x))
        self.counters["batches"] += 1
        return out

    def forward(self, x: np.ndarray) -> np.ndarray:
        return self.model.session.run([self.metadata.output_name], {self.metadata.input_name: x})[0]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class indices (N,) of `self(x)`."""
        return self(x).argmax(axis=-1)

    def reset(self) -> None:
        self.counters = {k: 0 for k in self.counters}


class EdgeSource(EdgeAdapter):
    """The frozen source model (a ``frozen`` export)."""

    name = "source"
    mode = "frozen"


class EdgeAlphaBN(EdgeAdapter):
    """alpha-BN (You et al. 2021) run as one static graph (an ``alpha-bn`` export).

    small_batch: as the PyTorch adapter: ``"source"`` (default) predicts a one-image batch with the
    source statistics (the graph switches to them in-graph) and counts it in
    ``counters["small_batches"]``; ``"raise"`` raises `BatchTooSmallError`.
    """

    name = "alpha-bn"
    mode = "alpha-bn"

    def __init__(self, model: EdgeModel | str | os.PathLike[str], providers: str | list[str] = "auto",
                 small_batch: str = "source") -> None:
        super().__init__(model, providers)
        if small_batch not in ("source", "raise"):
            raise ConfigError(f"small_batch must be 'source' or 'raise', got {small_batch!r}")
        self.small_batch = small_batch

    @property
    def source_weight(self) -> float:
        return float(self.metadata.source_weight)

    def forward(self, x: np.ndarray) -> np.ndarray:
        if x.shape[0] < 2:
            if self.small_batch == "raise":
                raise BatchTooSmallError(
                    f"alpha-bn: a batch of {x.shape[0]} image is too small to estimate batch statistics; use a "
                    "larger batch (the video loop groups frames) or small_batch='source'"
                )
            self.counters["small_batches"] += 1
        return super().forward(x)


def check_state_path(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if path.suffix not in (".safetensors", ".npz"):
        raise ConfigError(f"edge states are written as .safetensors or .npz files, got {path}")
    return path


def describe(adapter: EdgeAdapter) -> dict[str, Any]:
    m = adapter.metadata
    return {"adapter": adapter.name, "mode": m.mode, "card": m.card, "provider": adapter.model.provider,
            "input_shape": list(m.input_shape), "num_classes": m.num_classes}
