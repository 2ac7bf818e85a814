"""Tuned presets: adapter values chosen on a validation stream, per model card (torch-free).

`tta tune` writes the values it chose into a preset file; ``--preset NAME`` (`tta run`, `tta bench`,
matrix parts) applies them. A preset file ``<NAME>.yaml`` holds, per card and adapter, the values, the
dataset preset they were tuned over, the card checkpoint's SHA-256 and the whole validation record
(stream, every grid point with its error, what was chosen, the command and package version):

    preset: tuned
    entries:
      resnet20-fmnist:
        cotta:
          base_preset: cifar10
          values: {ap: 0.8}
          checkpoint_sha256: fdd9...
          validation: {stream: fmnist-c-val, role: validation, points: [...], chosen: {...}, ...}

Files are found like cards (`tta.paths`, kind ``presets``): $TTA_PRESETS_DIR, ./presets, the per-user
folder (``~/.local/share/tta-runtime/presets`` on Linux), the presets shipped with the package; for a
(card, adapter) the first file in that order holding an entry wins. `tta tune` writes to the per-user
folder or to the path it is given, never into the package. Values tuned on another checkpoint of the
card are refused (retune after retraining).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tta import paths
from tta.errors import ConfigError
from tta.fileio import write_text_atomic

SUFFIXES = (".yaml", ".yml")
#: the preset name `tta tune` writes by default and the README uses
DEFAULT_TUNED = "tuned"
#: the dataset presets of the adapter configs (`tta.adapters.config.PRESET_NAMES`; repeated here torch-free)
DATASET_PRESETS = ("cifar10", "cifar100", "imagenet")


@dataclass(frozen=True)
class TunedEntry:
    """The tuned values of one adapter on one card, and where they were read from."""

    preset: str
    card: str
    adapter: str
    base_preset: str | None
    values: dict[str, Any]
    checkpoint_sha256: str | None
    validation: dict[str, Any]
    path: Path


def is_tuned_name(preset: str | None) -> bool:
    """Whether `preset` names a tuned preset (anything but a dataset preset or None)."""
    return preset is not None and preset not in DATASET_PRESETS


def _is_path(name: str) -> bool:
    return name.endswith(SUFFIXES) or "/" in name or os.sep in name


def _read(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"tuned preset {path} cannot be read: {exc}") from exc
    if raw is None:
        return {"entries": {}}
    if not isinstance(raw, dict) or not isinstance(raw.get("entries", {}), dict):
        raise ConfigError(f"tuned preset {path}: expected a mapping with 'entries' (card -> adapter -> values)")
    return raw


def preset_files(name: str) -> list[Path]:
    """The files of preset `name` in search order (a path names exactly one file)."""
    if _is_path(name):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError(f"tuned preset file {path} does not exist")
        return [path]
    if not name or name in (".", ".."):
        raise ConfigError(f"bad preset name {name!r}")
    files = []
    for d in paths.search_dirs("presets"):
        for suffix in SUFFIXES:
            p = d.path / f"{name}{suffix}"
            if p.is_file():
                files.append(p)
    return files


def find_tuned(name: str, card: str, adapter: str) -> TunedEntry | None:
    """The tuned entry of (`card`, `adapter`) in preset `name` (first file in search order), or None."""
    for path in preset_files(name):
        entry = (_read(path).get("entries") or {}).get(card, {}).get(adapter)
        if entry is None:
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("values"), dict):
            raise ConfigError(f"tuned preset {path}: entry {card}/{adapter} has no 'values' mapping")
        return TunedEntry(name, card, adapter, entry.get("base_preset"), dict(entry["values"]),
                          entry.get("checkpoint_sha256"), dict(entry.get("validation") or {}), path)
    return None


def resolve(preset: str | None, card: Any, adapter: str, *, required: bool) -> tuple[str | None, dict[str, Any],
                                                                                      TunedEntry | None]:
    """(dataset preset, config values, entry) for `preset` on `card` (a `ModelCard`) and `adapter`.

    A dataset preset (or None) passes through with no values. A tuned preset gives the dataset preset
    its values were tuned over and the values; a card whose checkpoint differs from the one tuned on is
    refused. Without an entry: ConfigError when `required`, else (None, {}, None): the caller runs the
    adapter at its defaults and says so."""
    if not is_tuned_name(preset):
        return preset, {}, None
    entry = find_tuned(str(preset), card.name, adapter)
    if entry is None:
        if required:
            where = ", ".join(str(p) for p in preset_files(str(preset))) or paths.describe_search("presets")
            raise ConfigError(f"tuned preset {preset!r} has no values for {adapter} on card {card.name} (looked in "
                              f"{where}); tune it: tta tune --adapter {adapter} --model {card.name} --grid KEY=V1,V2")
        return None, {}, None
    if entry.checkpoint_sha256 and card.sha256 and entry.checkpoint_sha256 != card.sha256:
        raise ConfigError(f"tuned preset {entry.path}: {adapter} was tuned on another checkpoint of card {card.name} "
                          f"(sha256 {entry.checkpoint_sha256[:12]}..., the card's is {card.sha256[:12]}...); "
                          "retune it")
    return entry.base_preset, entry.values, entry


def output_path(name_or_path: str) -> Path:
    """Where `tta tune` writes preset `name_or_path`: that path, else ``<per-user presets>/<name>.yaml``
    (never inside the installed package or the shipped folders)."""
    path = Path(name_or_path).expanduser() if _is_path(name_or_path) else paths.user_dir("presets") / f"{name_or_path}.yaml"
    if paths.is_packaged(path):
        raise ConfigError(f"{path} lies inside the installed package; tuned presets go to the per-user folder "
                          f"({paths.user_dir('presets')}) or a path of yours")
    return path


def save_entry(path: Path, card: str, adapter: str, entry: dict[str, Any]) -> Path:
    """Write (card, adapter)'s entry into the preset file at `path`, keeping its other entries (atomic)."""
    raw = _read(path) if path.is_file() else {}
    raw.setdefault("preset", path.stem)
    entries = raw.setdefault("entries", {}) or {}
    raw["entries"] = entries
    entries.setdefault(card, {})[adapter] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ("# Tuned preset: adapter values chosen by `tta tune` on validation streams only (tta.protocol.presets).\n"
              "# Apply with --preset " + str(raw["preset"]) + "; every grid point and its validation error is kept below.\n")
    return write_text_atomic(path, header + yaml.safe_dump(raw, sort_keys=False, width=110))


__all__ = ["DEFAULT_TUNED", "TunedEntry", "find_tuned", "is_tuned_name", "output_path", "preset_files", "resolve",
           "save_entry"]
