"""Typed adapter configuration: dataclasses with paper defaults, dataset presets and string parsing.

Every adapter has a config dataclass deriving from `AdapterConfig`. Class attribute `PRESETS` maps a
dataset preset name (``cifar10``, ``cifar100``, ``imagenet``) to the fields it overrides; fields not in
a preset keep the paper defaults written in the dataclass.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal, get_args, get_origin

from tta.errors import ConfigError

PRESET_NAMES = ("cifar10", "cifar100", "imagenet")
CARD = "card"  # CLI marker: take this config value from the model card (``--set ap=card``)


@dataclass
class AdapterConfig:
    """Options shared by every adapter.

    steps: adaptation steps per batch (the prediction returned is the one from the last step).
    episodic: reset to the source state before every batch.
    small_batch: what batch-statistics adapters do with a batch smaller than they can estimate
        statistics from (one sample): ``"source"`` predicts it with the source normalisation
        statistics and does not adapt on it (counted in ``adapter.counters["small_batches"]``);
        ``"raise"`` raises `BatchTooSmallError`.
    seed: seed of the adapter's own random generators (augmentations, restore masks); None draws
        the seed from torch's global generator at construction.
    input_size: (H, W) every batch must have; None = what the model declares (a card's input size,
        a fixed-size patch embedding), else any size (`tta.adapters.inputs`).
    input_range: (lo, hi) every input value must lie in (may be infinite); None = what the model
        declares (card models: [0, 1]), else any finite value.

    Every float field must be finite (``input_range`` excepted): ``lr=inf`` is refused, not run.
    """

    steps: int = 1
    episodic: bool = False
    small_batch: Literal["source", "raise"] = "source"
    seed: int | None = None
    input_size: tuple[int, int] | None = None
    input_range: tuple[float, float] | None = None

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    #: config keys a model card can supply on the CLI (``key=card``): config key -> card attribute
    CARD_FIELDS: ClassVar[dict[str, str]] = {}

    #: float fields allowed to be infinite (bounds)
    UNBOUNDED: ClassVar[frozenset[str]] = frozenset({"input_range"})

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            values = value if isinstance(value, tuple) else (value,)
            if any(isinstance(v, float) and (math.isnan(v) or (math.isinf(v) and f.name not in self.UNBOUNDED))
                   for v in values):
                raise ConfigError(f"{f.name} must be finite, got {value!r}")
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.small_batch not in ("source", "raise"):
            raise ConfigError(f"small_batch must be 'source' or 'raise', got {self.small_batch!r}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be in [0, 2**63) or None, got {self.seed}")
        if self.input_size is not None and (len(self.input_size) != 2 or min(self.input_size) < 1):
            raise ConfigError(f"input_size must be (H, W) with positive sides or None, got {self.input_size!r}")
        if self.input_range is not None and (len(self.input_range) != 2 or not self.input_range[0] < self.input_range[1]):
            raise ConfigError(f"input_range must be (lo, hi) with lo < hi or None, got {self.input_range!r}")

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def build(cls, preset: str | None = None, **overrides: Any) -> "AdapterConfig":
        """Paper defaults, then the preset's overrides, then `overrides` (validated)."""
        values: dict[str, Any] = {}
        if preset is not None:
            if preset not in PRESET_NAMES and preset not in cls.PRESETS:
                raise ConfigError(
                    f"unknown preset {preset!r} for {cls.__name__}; valid presets: "
                    f"{', '.join(sorted(set(PRESET_NAMES) | set(cls.PRESETS)))}"
                )
            values.update(cls.PRESETS.get(preset, {}))
        known = set(cls.field_names())
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(
                f"unknown config key(s) {', '.join(map(repr, unknown))} for {cls.__name__}; "
                f"valid keys: {', '.join(sorted(known))}"
            )
        values.update(overrides)
        hints = typing.get_type_hints(cls)
        coerced = {k: _coerce(k, hints[k], v) for k, v in values.items()}
        return cls(**coerced)

    @classmethod
    def parse_assignments(cls, assignments: list[str]) -> dict[str, Any]:
        """Parse CLI ``key=value`` strings into typed values (unknown keys raise `ConfigError`).

        ``key=card`` for a key in `CARD_FIELDS` is kept as the marker `CARD`; the CLI replaces it
        with the model card's value once the card is known. The values are validated here (a trial
        `build`), so a bad value fails before any data is loaded.
        """
        hints = typing.get_type_hints(cls)
        out: dict[str, Any] = {}
        for item in assignments:
            if "=" not in item:
                raise ConfigError(f"expected key=value, got {item!r}")
            key, raw = item.split("=", 1)
            key = key.strip().replace("-", "_")
            if key not in cls.field_names():
                raise ConfigError(
                    f"unknown config key {key!r} for {cls.__name__}; valid keys: "
                    f"{', '.join(sorted(cls.field_names()))}"
                )
            if raw.strip().lower() == CARD:
                if key not in cls.CARD_FIELDS:
                    raise ConfigError(
                        f"{cls.__name__}: {key!r} cannot be taken from a model card "
                        f"(card-backed keys: {', '.join(sorted(cls.CARD_FIELDS)) or 'none'})"
                    )
                out[key] = CARD
                continue
            out[key] = _parse_string(key, hints[key], raw.strip())
        cls.build(**{k: v for k, v in out.items() if v != CARD})
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "AdapterConfig":
        return type(self).build(**{**self.to_dict(), **changes})


@dataclass
class OptimConfig(AdapterConfig):
    """Optimizer options for gradient-based adapters (Adam/AdamW/SGD)."""

    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()  # every float finite
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise ConfigError(f"optimizer must be adam, adamw or sgd, got {self.optimizer!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas must be two values in [0, 1), got {self.betas!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0.0 <= self.dampening <= 1.0:
            raise ConfigError(f"dampening must be in [0, 1], got {self.dampening}")
        if not self.weight_decay >= 0.0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.nesterov and self.optimizer == "sgd" and (self.momentum == 0.0 or self.dampening != 0.0):
            raise ConfigError("nesterov needs momentum > 0 and dampening 0")


def _parse_string(key: str, tp: Any, raw: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        non_none = [a for a in args if a is not type(None)]
        if raw.lower() in ("none", "null") and len(non_none) < len(args):
            return None
        return _parse_string(key, non_none[0], raw)
    if tp is bool:
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected a boolean, got {raw!r}")
    if origin is tuple:
        parts = [p for p in raw.strip("()[] ").split(",") if p.strip()]
        return tuple(_parse_string(key, args[0] if args else str, p.strip()) for p in parts)
    if origin is Literal:
        return raw
    try:
        if tp is int:
            return int(raw)
        if tp is float:
            return float(raw)
    except ValueError:
        raise ConfigError(f"{key}: expected {tp.__name__}, got {raw!r}") from None
    return raw


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Light type check/coercion of programmatic values (ints for floats, lists for tuples)."""
    origin, args = get_origin(tp), get_args(tp)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{key} may not be None")
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        non_none = [a for a in args if a is not type(None)]
        return _coerce(key, non_none[0], value)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected a boolean, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            raise ConfigError(f"{key}: expected a tuple, got {value!r}")
        if not args:
            return tuple(value)
        types = (args[0],) * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(types) != len(value):
            raise ConfigError(f"{key}: expected {len(types)} values, got {value!r}")
        return tuple(_coerce(key, t, v) for t, v in zip(types, value))
    return value


__all__ = ["AdapterConfig", "CARD", "OptimConfig", "PRESET_NAMES", "field"]
