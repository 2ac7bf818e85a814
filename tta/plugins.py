"""Plugins: adapters and model builders from other distributions, and the torch-free adapter catalogue.

A plugin distribution declares entry points (pyproject.toml):

    [project.entry-points."tta.adapters"]
    conf-ent = "my_pkg.adapters:ConfidentEntropy"   # an Adapter subclass, registered under its name
    [project.entry-points."tta.models"]
    tiny-cnn = "my_pkg.nets:tiny_cnn"                # factory(num_classes=, in_chans=, **arch_kwargs)

Adapter entry points are loaded the first time a name is not found in the registry (or the whole
list is asked for); a class decorated with `tta.register_adapter` registers itself on import, an
undecorated `Adapter` subclass is registered under the entry point's name. A model card names a
builder by entry-point name (``arch: tiny-cnn``) or by import path (``arch: my_pkg.nets:tiny_cnn``).
``tta run --plugin MODULE`` imports a module first (for code that registers adapters on import but is
not installed as a distribution). A card's import path and a plugin run the named package's code, as
an installed plugin does: use cards and plugins you trust.

`builtin_adapters()` lists the registered built-in adapters without importing them (or torch): it
reads the ``@register_adapter("name")`` decorators of `tta/adapters/*.py` with `ast`, for `tta list`.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from tta.errors import ConfigError

ADAPTER_GROUP = "tta.adapters"
MODEL_GROUP = "tta.models"


class PluginError(ConfigError):
    """A plugin module, entry point or card factory cannot be imported or is not what it should be."""


@dataclass(frozen=True)
class CatalogEntry:
    """An adapter known without importing it: name, first docstring line, where it comes from."""

    name: str
    summary: str
    origin: str  # "built-in" or "plugin <distribution> <version> (<module:attr>)"


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _entry_points(group: str) -> list[metadata.EntryPoint]:
    return sorted(metadata.entry_points(group=group), key=lambda ep: ep.name)


def _describe(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    owner = f"{dist.name} {dist.version}" if dist is not None else "unknown distribution"
    return f"entry point {ep.name!r} = {ep.value!r} ({owner})"


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


# ---------------------------------------------------------------------------------- plugin modules
def import_plugin(module: str) -> Any:
    """Import a plugin module (``--plugin MODULE``); any failure becomes one `PluginError` line."""
    if not module or not all(part.isidentifier() for part in module.split(".")):
        raise PluginError(f"--plugin needs a module name such as 'my_pkg.adapters', got {module!r}")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module.startswith(exc.name):
            raise PluginError(f"plugin module {module!r} is not installed or not on the path ({exc})") from exc
        raise PluginError(f"plugin module {module!r} failed to import: {_one_line(exc)}") from exc
    except Exception as exc:  # noqa: BLE001 - a plugin's own error, reported as one line
        raise PluginError(f"plugin module {module!r} failed to import: {_one_line(exc)}") from exc


def import_factory(path: str, what: str) -> Callable[..., Any]:
    """The callable named by ``package.module:attr`` (``attr`` may be dotted)."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr or not all(p.isidentifier() for p in module_name.split(".") + attr.split(".")):
        raise PluginError(f"{what}: expected 'package.module:factory', got {path!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - ModuleNotFoundError or the module's own error
        raise PluginError(f"{what}: cannot import module {module_name!r} of {path!r} ({_one_line(exc)})") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PluginError(f"{what}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise PluginError(f"{what}: {path!r} is not callable")
    return obj


# ---------------------------------------------------------------------------------- adapter entry points
_adapter_plugins_loaded = False
_broken_adapters: dict[str, PluginError] = {}


def load_adapter_plugins() -> dict[str, PluginError]:
    """Load every ``tta.adapters`` entry point once; returns the broken ones by adapter name."""
    global _adapter_plugins_loaded
    if _adapter_plugins_loaded:
        return dict(_broken_adapters)
    _adapter_plugins_loaded = True
    from tta.adapters.base import Adapter
    from tta.adapters.registry import _REGISTRY, register_adapter

    for ep in _entry_points(ADAPTER_GROUP):
        name = _normalise(ep.name)
        try:
            obj = ep.load()
        except Exception as exc:  # noqa: BLE001 - reported when the adapter is asked for
            _broken_adapters[name] = PluginError(f"adapter plugin {_describe(ep)} failed to load: {_one_line(exc)}")
            continue
        if not (isinstance(obj, type) and issubclass(obj, Adapter)):
            _broken_adapters[name] = PluginError(f"adapter plugin {_describe(ep)} does not name an Adapter subclass")
            continue
        if name not in _REGISTRY and obj not in _REGISTRY.values():
            register_adapter(name)(obj)
    return dict(_broken_adapters)


def plugin_adapters() -> list[CatalogEntry]:
    """The ``tta.adapters`` entry points, read from the installed metadata (nothing imported)."""
    out = []
    for ep in _entry_points(ADAPTER_GROUP):
        dist = getattr(ep, "dist", None)
        owner = f"{dist.name} {dist.version}" if dist is not None else "?"
        out.append(CatalogEntry(_normalise(ep.name), "", f"plugin {owner} ({ep.value})"))
    return out


# ---------------------------------------------------------------------------------- model builders
def model_builder(name: str) -> Callable[..., Any] | None:
    """The factory of ``tta.models`` entry point `name` (None when no plugin declares it)."""
    for ep in _entry_points(MODEL_GROUP):
        if ep.name == name:
            try:
                obj = ep.load()
            except Exception as exc:  # noqa: BLE001
                raise PluginError(f"model plugin {_describe(ep)} failed to load: {_one_line(exc)}") from exc
            if not callable(obj):
                raise PluginError(f"model plugin {_describe(ep)} is not callable")
            return obj
    return None


# ---------------------------------------------------------------------------------- torch-free catalogue
def builtin_adapters() -> list[CatalogEntry]:
    """Built-in adapters from the ``@register_adapter("name")`` decorators in `tta/adapters/*.py`."""
    spec = importlib.util.find_spec("tta.adapters")  # imports `tta` only, not `tta.adapters`
    if spec is None or not spec.submodule_search_locations:
        return []
    entries: dict[str, CatalogEntry] = {}
    for folder in spec.submodule_search_locations:
        for path in sorted(Path(folder).glob("*.py")):
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            except (OSError, SyntaxError):
                continue
            for node in ast.walk(tree):
                if not isinstance(node, ast.ClassDef):
                    continue
                for deco in node.decorator_list:
                    if (isinstance(deco, ast.Call) and getattr(deco.func, "id", getattr(deco.func, "attr", None))
                            == "register_adapter" and deco.args and isinstance(deco.args[0], ast.Constant)):
                        doc = (ast.get_docstring(node) or "").strip()
                        name = _normalise(str(deco.args[0].value))
                        entries[name] = CatalogEntry(name, doc.splitlines()[0] if doc else "", "built-in")
    return [entries[k] for k in sorted(entries)]


def adapter_catalog() -> list[CatalogEntry]:
    """Built-in adapters and plugin entry points, without importing either (`tta list`)."""
    builtin = builtin_adapters()
    names = {e.name for e in builtin}
    return builtin + [e for e in plugin_adapters() if e.name not in names]
