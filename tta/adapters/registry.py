"""Adapter registry: names -> adapter classes, and the factory behind `tta.adapt`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, TypeVar

from torch import nn

from tta.errors import ConfigError

if TYPE_CHECKING:
    from tta.adapters.base import Adapter

_REGISTRY: dict[str, type["Adapter"]] = {}
A = TypeVar("A", bound=type)


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def register_adapter(name: str) -> Callable[[A], A]:
    """Class decorator: register an `Adapter` subclass under `name`."""

    def deco(cls: A) -> A:
        key = _normalise(name)
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            raise ValueError(f"adapter name {key!r} is already registered by {_REGISTRY[key].__name__}")
        cls.name = key  # type: ignore[attr-defined]
        _REGISTRY[key] = cls  # type: ignore[assignment]
        return cls

    return deco


def list_adapters() -> list[str]:
    """Names of every registered adapter, the plugins' (`tta.plugins`) included; a broken plugin is
    left out with a warning (asking for it by name raises its error)."""
    import warnings

    from tta.plugins import load_adapter_plugins

    for error in load_adapter_plugins().values():
        warnings.warn(str(error), stacklevel=2)
    return sorted(_REGISTRY)


def get_adapter_class(name: str) -> type["Adapter"]:
    """The adapter class registered as `name`; unknown names load the plugin entry points first."""
    key = _normalise(name) if isinstance(name, str) else name
    if key not in _REGISTRY and isinstance(key, str):
        from tta.plugins import load_adapter_plugins

        broken = load_adapter_plugins()
        if key in broken:
            raise broken[key]
    try:
        return _REGISTRY[key]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown adapter {name!r}; valid adapters: {', '.join(sorted(_REGISTRY))}") from None


def adapter_config(name: str, preset: str | None = None, **overrides: Any):
    """The typed config of adapter `name`: paper defaults < preset < overrides."""
    return get_adapter_class(name).Config.build(preset=preset, **overrides)


def adapt(model: nn.Module, name: str, preset: str | None = None, *, inplace: bool = False,
          **config: Any) -> "Adapter":
    """Wrap `model` in adapter `name`; returns the adapted `nn.Module` (predict-and-adapt forward).

    `preset` selects dataset defaults from the papers (``cifar10``, ``cifar100``, ``imagenet``);
    keyword arguments override single config fields (unknown keys raise `ConfigError`).
    `model` itself is left untouched: the adapter works on a copy made once, here. ``inplace=True``
    adapts `model` itself (layers swapped, requires_grad set) and saves that copy's memory.
    """
    from tta.adapters.base import copy_model

    cls = get_adapter_class(name)
    cfg = cls.Config.build(preset=preset, **config)
    return cls(model if inplace else copy_model(model, cls.name), cfg)
