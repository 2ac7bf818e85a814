"""tta: a continual test-time adaptation runtime for vision models.

    import tta
    adapted = tta.adapt(model, "tent", preset="cifar10")
    logits = adapted(x)          # predicts and adapts on the batch

The adapter API is imported on first use (PEP 562), so torch-free subpackages such as `tta.edge`
(numpy + onnxruntime only) can be imported on devices without torch; reaching a torch feature there
raises `tta.errors.MissingDependencyError` naming the extra to install (`tta.dependencies`).
"""

from __future__ import annotations

import importlib
from typing import Any

from tta.errors import TTAError

__version__ = "0.1.0"

_LAZY = {"Adapter": "tta.adapters", "adapt": "tta.adapters", "adapter_config": "tta.adapters",
         "list_adapters": "tta.adapters", "register_adapter": "tta.adapters"}
#: subpackages reachable as attributes (``tta.models.load(...)``) without importing them up front
_SUBPACKAGES = ("adapters", "edge", "engine", "export", "models", "ops", "streams")

__all__ = ["Adapter", "TTAError", "adapt", "adapter_config", "list_adapters", "register_adapter", "__version__"]


def _import(module: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        from tta.dependencies import missing_dependency

        missing = missing_dependency(exc, what)
        if missing is None:
            raise
        raise missing from exc


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return _import(f"tta.{name}", f"tta.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tta' has no attribute {name!r}")
    value = getattr(_import(module, f"tta.{name}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBPACKAGES))
