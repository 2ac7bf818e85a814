"""Where the runtime finds its files and where it writes them (torch-free).

Model cards (``models/``) and stream specs (``streams/``) are searched in this order; every folder
adds its entries and the first folder holding a name wins it:

1. the folder named by ``TTA_MODELS_DIR`` / ``TTA_STREAMS_DIR``;
2. ``models/`` / ``streams/`` in the working directory;
3. the per-user folder (platformdirs; on Linux ``~/.local/share/tta-runtime/models`` and ``.../streams``);
4. the files shipped with the package (``tta/_data/models`` and ``tta/_data/streams`` in an installed
   wheel, read through `importlib.resources`; the repository's top-level folders in a source checkout).

Data (Fashion-MNIST-C and the other "-C" sets) lives under the data root: ``TTA_DATA_DIR``, else the
per-user ``data`` folder. Files generated for a model card (AdaNPC memory ``<card>.memory.safetensors``,
ViDA warm-up ``<card>.vida.safetensors``, ...) are written beside the card when the card is the user's
own (a folder outside the package that can be written), else into the per-user ``models`` folder; they
are read from that same place first (so a rebuilt file wins), then from the other. Nothing is ever
written into the installed package or the shipped folders of a source checkout.
"""

from __future__ import annotations

import importlib.resources
import os
from dataclasses import dataclass
from pathlib import Path

APP_NAME = "tta-runtime"
ENV_VARS = {"models": "TTA_MODELS_DIR", "streams": "TTA_STREAMS_DIR"}
DATA_ENV = "TTA_DATA_DIR"
KINDS = tuple(ENV_VARS)


@dataclass(frozen=True)
class Found:
    """A file found by the search: its path and which folder of the search order it came from."""

    path: Path
    origin: str  # "$TTA_MODELS_DIR", "working directory", "user folder", "package", "source checkout", "path"


def user_data_dir() -> Path:
    """The per-user data folder (platformdirs; honours ``XDG_DATA_HOME`` on Linux)."""
    import platformdirs

    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def user_dir(kind: str) -> Path:
    """The per-user ``models``, ``streams`` or ``data`` folder (it may not exist yet)."""
    return user_data_dir() / kind


def data_root() -> Path:
    """Root of the datasets: ``$TTA_DATA_DIR``, else the per-user ``data`` folder."""
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else user_dir("data")


def packaged_dir(kind: str) -> tuple[Path, str] | None:
    """The shipped ``models`` / ``streams`` folder and its origin label, or None when absent.

    An installed wheel carries them as package data under ``tta/_data``; a source checkout (or an
    editable install of one) keeps them at the repository root, beside the ``tta`` package.
    """
    _check_kind(kind)
    shipped = Path(str(importlib.resources.files("tta") / "_data" / kind))
    if shipped.is_dir():
        return shipped, "package"
    package = Path(str(importlib.resources.files("tta")))
    checkout = package.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / kind).is_dir():
        return checkout / kind, "source checkout"
    return None


def search_dirs(kind: str) -> list[Found]:
    """The folders searched for ``kind`` ("models" or "streams"), in order, existing or not."""
    _check_kind(kind)
    dirs: list[Found] = []
    env = os.environ.get(ENV_VARS[kind])
    if env:
        dirs.append(Found(Path(env).expanduser(), f"${ENV_VARS[kind]}"))
    dirs.append(Found(Path.cwd() / kind, "working directory"))
    dirs.append(Found(user_dir(kind), "user folder"))
    shipped = packaged_dir(kind)
    if shipped is not None:
        dirs.append(Found(*shipped))
    unique: list[Found] = []
    seen: set[Path] = set()
    for d in dirs:
        key = _resolved(d.path)
        if key not in seen:
            seen.add(key)
            unique.append(d)
    return unique


def list_entries(kind: str, suffixes: tuple[str, ...]) -> dict[str, Found]:
    """Every ``<name><suffix>`` file of the search folders, by name; the first folder wins a name."""
    entries: dict[str, Found] = {}
    for d in search_dirs(kind):
        if not d.path.is_dir():
            continue
        for path in sorted(d.path.iterdir()):
            if path.suffix in suffixes and path.is_file():
                entries.setdefault(path.stem, Found(path, d.origin))
    return dict(sorted(entries.items()))


def find_entry(kind: str, name: str, suffixes: tuple[str, ...]) -> Found | None:
    """The file of entry ``name`` (``<folder>/<name><suffix>``) in search order, or None."""
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        return None
    for d in search_dirs(kind):
        for suffix in suffixes:
            path = d.path / f"{name}{suffix}"
            if path.is_file():
                return Found(path, d.origin)
    return None


def describe_search(kind: str) -> str:
    """One line naming the folders searched, for error messages and `tta list`."""
    return ", ".join(f"{d.path} ({d.origin})" for d in search_dirs(kind))


def is_packaged(path: str | os.PathLike[str]) -> bool:
    """Whether `path` lies inside the files shipped with the package (never written to)."""
    target = _resolved(Path(path))
    for kind in KINDS:
        shipped = packaged_dir(kind)
        if shipped is not None and target.is_relative_to(_resolved(shipped[0])):
            return True
    return target.is_relative_to(_resolved(Path(str(importlib.resources.files("tta")))))


def artifact_name(card_name: str, suffix: str) -> str:
    """``<card><suffix>``; `suffix` is e.g. ``.memory.safetensors`` (a leading dot, no folder parts)."""
    if not suffix.startswith(".") or "/" in suffix or "\\" in suffix or ".." in suffix:
        from tta.errors import ConfigError

        raise ConfigError(f"artefact suffix must look like '.memory.safetensors', got {suffix!r}")
    return f"{card_name}{suffix}"


def artifact_candidates(card_name: str, card_path: Path | None, suffix: str) -> list[Path]:
    """Where a card's artefact is looked for, in order: where it would be written, then the other place."""
    first = artifact_output_path(card_name, card_path, suffix)
    others = [card_path.parent / first.name] if card_path is not None else []
    others.append(user_dir("models") / first.name)
    return [first] + [p for p in others if p != first]


def find_artifact(card_name: str, card_path: Path | None, suffix: str) -> Path | None:
    """An existing artefact of a card (see `artifact_candidates` for the order), or None."""
    return next((p for p in artifact_candidates(card_name, card_path, suffix) if p.is_file()), None)


def artifact_output_path(card_name: str, card_path: Path | None, suffix: str) -> Path:
    """Where to write a card's artefact: beside the card when that folder is the user's and
    writable, else the per-user ``models`` folder (never inside the installed package)."""
    name = artifact_name(card_name, suffix)
    if card_path is not None:
        folder = card_path.parent
        if not is_packaged(folder) and os.access(folder, os.W_OK):
            return folder / name
    return user_dir("models") / name


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except OSError:
        return path.absolute()
