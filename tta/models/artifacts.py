"""Tensor files generated for a model card (AdaNPC's source memory, EATA's Fisher information, RMT's
source prototypes): safetensors with a ``format`` tag in their metadata, written atomically and
read back with the tag checked. Where such a file lives is `ModelCard.artifact_path`; what its
tensors must look like is checked by the method that uses it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from tta.errors import DataNotFoundError
from tta.fileio import write_durable


def write_artifact(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], format: str,
                   metadata: Mapping[str, object] | None = None) -> Path:
    """Write `tensors` (moved to the CPU, contiguous) with ``{"format": format, **metadata}`` (values
    as strings) through `tta.fileio.write_durable`: a reader never sees half a file, a failed write
    leaves the previous file in place, and the file gets the umask's mode like any other."""
    from safetensors.torch import save

    blob = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                metadata={"format": format, **{k: str(v) for k, v in (metadata or {}).items()}})
    return write_durable(path, blob)


def read_artifact(path: str | os.PathLike[str], format: str, what: str,
                  build_command: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors by name, metadata) of the artefact file at `path`, whose metadata must carry
    ``format``. Raises `DataNotFoundError` naming `what` (e.g. ``"EATA Fisher"``) when the file is
    missing (with the `build_command` that makes it), unreadable or of another format."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"no {what} file at {path}; build one with `{build_command}`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # not safetensors, truncated
        raise DataNotFoundError(f"{path} is not a readable {what} file: {exc}") from exc
    if meta.get("format") != format:
        raise DataNotFoundError(f"{path}: not an {what} file (format {meta.get('format')!r})")
    return tensors, meta


__all__ = ["read_artifact", "write_artifact"]
