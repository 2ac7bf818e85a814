"""Errors of the edge runtime (all derive from `tta.errors`, which imports nothing heavy)."""

from __future__ import annotations

from tta.errors import DataNotFoundError, InvalidInputError, StateMismatchError, TTAError


class ModelFileError(DataNotFoundError):
    """An exported model file is missing, truncated or not an ONNX model."""


class MetadataError(TTAError, ValueError):
    """An ONNX file lacks the `tta` export metadata, or the metadata contradicts the graph."""


class ProviderError(TTAError, RuntimeError):
    """No requested onnxruntime execution provider can run the model."""


__all__ = ["InvalidInputError", "MetadataError", "ModelFileError", "ProviderError", "StateMismatchError"]
