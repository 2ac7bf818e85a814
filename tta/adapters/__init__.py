"""Adapters: base class, typed configs, the registry, and every registered method."""

from tta.adapters.base import Adapter, save_state
from tta.adapters.config import AdapterConfig, OptimConfig
from tta.adapters.inputs import declare_input
from tta.adapters.registry import adapt, adapter_config, get_adapter_class, list_adapters, register_adapter

# Importing a method module registers it.
from tta.adapters import adanpc, cotta, norm, tent, vdp, vida  # noqa: E402,F401
from tta.adapters import deyo, eata, roid, sar  # noqa: E402,F401

__all__ = [
    "Adapter",
    "AdapterConfig",
    "OptimConfig",
    "adapt",
    "adapter_config",
    "declare_input",
    "get_adapter_class",
    "list_adapters",
    "register_adapter",
    "save_state",
]
