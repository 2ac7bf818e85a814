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
from tta.fileio import default_file_mode


def write_artifact(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], format: str,
                   metadata: Mapping[str, object] | None = None) -> Path:
    """Write `tensors` (moved to the CPU, contiguous) with ``{"format": format, **metadata}`` (values
    as strings) to ``.<name>.tmp`` beside `path`, then rename it onto `path`: a reader never sees half
    a file, and a failed write leaves the previous file in place."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"format": format, **{k: str(v) for k, v in (metadata or {}).items()}})
        os.chmod(tmp, default_file_mode())  # safetensors writes 0600; an artefact is as readable as its card
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


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
