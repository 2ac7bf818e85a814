"""Streams: datasets, corruptions, CTTA settings and YAML stream specs.

Public names are imported lazily (``tta.streams.load_spec`` etc.) so that importing
`tta.streams.base` (what the engine needs) does not pull in OpenCV/scipy.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Batch": "base", "Stream": "base", "TensorStream": "base",
    "corrupt": "corruptions", "CORRUPTIONS": "corruptions", "STANDARD_ORDER": "corruptions",
    "EXTRA_CORRUPTIONS": "corruptions",
    "DomainData": "datasets", "ArrayDomain": "datasets", "FileDomain": "datasets",
    "CorruptionArraySet": "datasets", "ImageNetCSet": "datasets", "image_folder": "datasets",
    "VideoFrames": "datasets", "read_image_list": "datasets",
    "load_fashion_mnist": "fashion_mnist",
    "make_c": "generate",
    "ContinualStream": "settings", "GradualStream": "settings", "MixedDomainStream": "settings",
    "SegmentStream": "settings", "Segment": "settings", "dirichlet_order": "settings",
    "StreamSpec": "specs", "load_spec": "specs", "list_specs": "specs", "DEFAULT_SPEC": "specs",
    "data_root": "specs", "spec_entries": "specs",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"tta.streams.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tta.streams' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
