"""Exceptions raised by the runtime. Every error a user can cause derives from `TTAError`."""

from __future__ import annotations


class TTAError(Exception):
    """Base class of every error raised by `tta`."""


class InvalidInputError(TTAError, ValueError):
    """A batch handed to an adapter is malformed (rank, shape, dtype, empty...)."""


class InputValueError(InvalidInputError):
    """A batch's values are unusable (non-finite or outside the model's input range); the adapter
    did not adapt on it and its state is unchanged."""


class NonFiniteInputError(InputValueError):
    """A batch contains NaN or Inf values; the adapter did not adapt on it."""


class InputRangeError(InputValueError):
    """A batch has values outside the input range the model declares (e.g. [0, 255] for [0, 1])."""


class BatchTooSmallError(InvalidInputError):
    """A batch-statistics adapter got fewer samples than it needs to estimate statistics."""


class ConfigError(TTAError, ValueError):
    """Unknown adapter name, unknown config key, bad config value or unknown preset."""


class NoAdaptableLayerError(TTAError, ValueError):
    """The model has no layer the adapter can adapt (e.g. no BatchNorm for `bn`)."""


class StateMismatchError(TTAError, ValueError):
    """A saved adapter state does not belong to this adapter/model."""


class DataNotFoundError(TTAError, FileNotFoundError):
    """A dataset, stream spec, model card or checkpoint file is missing or malformed."""


class MissingDependencyError(TTAError, ImportError):
    """A feature needs a package of an extra that is not installed (e.g. torch on an edge install)."""


class StreamRemovedError(TTAError, RuntimeError):
    """A `StreamPool` call waited for a stream that another thread removed meanwhile."""
