"""Checks of command-line values made before a command starts work (nothing is written on a mistake)."""

from __future__ import annotations

import os
from pathlib import Path

from tta.errors import ConfigError


def check_out_dir(out: str | None, option: str = "--out") -> Path | None:
    """Check up front that a folder can be written at `out` (created later, after every other check)."""
    if out is None:
        return None
    path = Path(out).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{option} {out}: exists and is not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{option} {out}: the folder is not writable")
        return path
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{option} {out}: cannot create a folder under {parent}, which is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {out}: cannot create it, {parent} is not writable")
    return path


def make_out_dir(path: Path | None) -> Path | None:
    if path is not None:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--out {path}: cannot create the folder ({exc.strerror or exc})") from exc
    return path


def check_out_file(out: str | os.PathLike[str] | None, option: str = "--out") -> Path | None:
    """Check up front that a file can be written at `out` (its folder exists or can be created)."""
    if out is None:
        return None
    path = Path(out).expanduser()
    if path.is_dir():
        raise ConfigError(f"{option} {out}: is a folder, a file name is needed")
    check_out_dir(str(path.parent), option)
    return path


def check_positive(**values: int | None) -> None:
    """Every given option value (None: not given) must be >= 1; keys are option names without dashes."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
