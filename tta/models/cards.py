"""Model cards: YAML files describing a checkpoint, found by name in the search order of `tta.paths`
($TTA_MODELS_DIR, ./models, the per-user folder, the cards shipped with the package) or by path.

A card names the architecture, classes, input size, input normalisation (applied inside the loaded
model), the checkpoint file (a path relative to the card, inside the card's folder) and its SHA-256,
how to read pooled features, the measured clean accuracy, the CoTTA confidence threshold and the exact
command that produced the checkpoint. `load(card)` returns the model in eval mode taking float [0, 1]
NCHW images. Reading and listing cards needs neither torch nor timm (`tta list`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from tta import paths
from tta.errors import ConfigError, DataNotFoundError

if TYPE_CHECKING:
    import torch
    from torch import nn

DEFAULT_CARD = "resnet20-fmnist"
VIT_CARD = "vit-fmnist"
CARD_SUFFIXES = (".yaml", ".yml")


@dataclass
class ModelCard:
    name: str
    arch: str
    num_classes: int
    checkpoint: str  # relative to the card's folder (or absolute)
    sha256: str | None = None
    input_size: tuple[int, int, int] = (3, 32, 32)  # C, H, W the model expects
    mean: tuple[float, ...] | None = None  # None: the network takes [0, 1] inputs as they are
    std: tuple[float, ...] | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    feature_layer: str = "forward_features"
    dataset: str | None = None
    clean_accuracy: float | None = None  # % on the dataset's test split
    clean_correct: int | None = None
    num_test: int | None = None
    cotta_threshold: float | None = None
    #: collapse-guard settings for this model (keys of `tta.engine.GuardConfig`), the guard's defaults
    #: wherever it runs on the card's model (`tta run --guard`, `run_stream(guard=True)`)
    guard: dict[str, Any] = field(default_factory=dict)
    preprocessing: str | None = None  # e.g. "Res256Crop224" for ImageNet checkpoints
    training: dict[str, Any] = field(default_factory=dict)
    command: str | None = None
    notes: str | None = None
    path: Path | None = field(default=None, compare=False)  # where the card was read from

    @property
    def in_chans(self) -> int:
        return self.input_size[0]

    def checkpoint_path(self) -> Path:
        """The checkpoint file. A card read from a file names it relative to the card's folder and may
        not reach outside that folder; a card built in code (no `path`) may give an absolute path."""
        ckpt = Path(self.checkpoint)
        if self.path is None:
            return ckpt
        folder = self.path.parent.resolve()
        resolved = (folder / ckpt).resolve()
        if ckpt.is_absolute() or not resolved.is_relative_to(folder):
            raise DataNotFoundError(
                f"model card {self.path}: checkpoint {self.checkpoint!r} must be a file in the card's folder "
                f"{folder} (a relative path such as 'name.safetensors')"
            )
        return resolved

    def artifact_path(self, suffix: str) -> Path | None:
        """The existing file ``<name><suffix>`` generated for this card (e.g. ``".memory.safetensors"``),
        or None. Looked for where `artifact_output_path` writes it first, then beside the card / in the
        per-user ``models`` folder (`tta.paths`)."""
        from tta.paths import find_artifact

        return find_artifact(self.name, self.path, suffix)

    def artifact_output_path(self, suffix: str) -> Path:
        """Where to write ``<name><suffix>`` for this card: beside the card when the card is the user's
        own and its folder writable, else the per-user ``models`` folder; never inside the package."""
        from tta.paths import artifact_output_path

        return artifact_output_path(self.name, self.path, suffix)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "path"}
        out["input_size"] = list(self.input_size)
        out["normalization"] = {
            "inside_model": True,
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
        }
        del out["mean"], out["std"]
        return {k: v for k, v in out.items() if v not in (None, {}, [])}

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: Path | None = None) -> ModelCard:
        where = path or "<card>"
        data = dict(data)
        norm = data.pop("normalization", None) or {}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise DataNotFoundError(f"model card {where}: unknown field(s) {unknown}")
        missing = [k for k in ("name", "arch", "num_classes", "checkpoint") if k not in data]
        if missing:
            raise DataNotFoundError(f"model card {where}: missing required field(s) {missing}")
        _check_types(data, where)
        if "input_size" in data:
            size = data["input_size"]
            if not isinstance(size, list) or len(size) != 3 or not all(_is_int(v) and v > 0 for v in size):
                raise DataNotFoundError(f"model card {where}: input_size must be [C, H, W] of positive integers, "
                                        f"got {size!r}")
            data["input_size"] = tuple(size)
        if not isinstance(norm, dict):
            raise DataNotFoundError(f"model card {where}: normalization must be a mapping with mean and std")
        mean, std = norm.get("mean"), norm.get("std")
        if (mean is None) != (std is None) or (mean is not None and (
                not _numbers(mean) or not _numbers(std) or len(mean) != len(std) or any(v <= 0 for v in std))):
            raise DataNotFoundError(f"model card {where}: normalization needs mean and std as lists of numbers of "
                                    f"equal length (std > 0), got mean={mean!r} std={std!r}")
        if data.get("guard"):
            _check_guard(data["guard"], where)
        return cls(**data, mean=None if mean is None else tuple(mean), std=None if std is None else tuple(std), path=path)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the card as YAML (the checkpoint path stays as given: keep it relative to `path`)."""
        path = Path(path)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, width=120))
        self.path = path
        return path


_REQUIRED_TYPES: dict[str, tuple[type, ...]] = {"name": (str,), "arch": (str,), "checkpoint": (str,)}
_OPTIONAL_TYPES: dict[str, tuple[type, ...]] = {
    "sha256": (str,), "arch_kwargs": (dict,), "feature_layer": (str,), "dataset": (str,),
    "clean_accuracy": (int, float), "cotta_threshold": (int, float), "preprocessing": (str,),
    "training": (dict,), "command": (str,), "notes": (str,), "guard": (dict,),
}


def _check_guard(guard: dict[str, Any], where: Any) -> None:
    from tta.engine.guard import GuardConfig

    try:
        GuardConfig.from_mapping(guard)
    except ConfigError as exc:
        raise DataNotFoundError(f"model card {where}: {exc}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _numbers(values: Any) -> bool:
    return isinstance(values, list) and bool(values) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def _check_types(data: dict[str, Any], where: Any) -> None:
    """Every card field of the YAML type it needs, or a DataNotFoundError naming the field."""
    for key, types in {**_REQUIRED_TYPES, **_OPTIONAL_TYPES}.items():
        value = data.get(key)
        if (value is not None or key in _REQUIRED_TYPES) and (
                not isinstance(value, types) or isinstance(value, bool)):
            kinds = " or ".join("number" if t in (int, float) else {str: "string", dict: "mapping"}[t]
                                for t in dict.fromkeys(types))
            raise DataNotFoundError(f"model card {where}: {key} must be a {kinds}, got {value!r}")
    for key in ("num_classes", "clean_correct", "num_test"):
        value = data.get(key)
        if (value is not None or key == "num_classes") and not (_is_int(value) and value > 0):
            raise DataNotFoundError(f"model card {where}: {key} must be a positive integer, got {value!r}")
    if data.get("sha256") is not None and (len(data["sha256"]) != 64 or
                                           any(c not in "0123456789abcdefABCDEF" for c in data["sha256"])):
        raise DataNotFoundError(f"model card {where}: sha256 must be 64 hex digits, got {data['sha256']!r}")
    if not data["name"] or "/" in data["name"] or "\\" in data["name"]:
        raise DataNotFoundError(f"model card {where}: name must be a plain name, got {data['name']!r}")


def _card_path(name_or_path: str | os.PathLike[str]) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix in CARD_SUFFIXES:
        if candidate.is_file():
            return candidate
        raise DataNotFoundError(f"model card file {candidate} does not exist")
    found = paths.find_entry("models", str(name_or_path), CARD_SUFFIXES)
    if found is not None:
        return found.path
    raise DataNotFoundError(
        f"unknown model card {str(name_or_path)!r}: no {name_or_path}.yaml in {paths.describe_search('models')} "
        f"(available: {', '.join(list_cards()) or 'none'})"
    )


def get_card(card: str | os.PathLike[str] | ModelCard) -> ModelCard:
    """A card by name (`models/<name>.yaml`), by path to a YAML file, or passed through."""
    if isinstance(card, ModelCard):
        return card
    path = _card_path(card)
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DataNotFoundError(f"model card {path} is not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise DataNotFoundError(f"model card {path} must be a YAML mapping")
    return ModelCard.from_dict(data, path)


def card_entries() -> dict[str, paths.Found]:
    """Every card in the search order of `tta.paths`, by name, with where it was found."""
    return paths.list_entries("models", CARD_SUFFIXES)


def list_cards() -> list[str]:
    """Names of the cards found (see `card_entries`)."""
    return list(card_entries())


def wrap_normalization(net: nn.Module, mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> nn.Module:
    from tta.models.normalize import Normalized

    return net if mean is None else Normalized(net, mean, std)


def load(card: str | os.PathLike[str] | ModelCard, device: str | torch.device = "cpu") -> nn.Module:
    """Build the card's architecture, verify and load its checkpoint; eval mode, [0, 1] NCHW inputs."""
    from tta.models.builders import build_model
    from tta.models.checkpoint import load_into, load_state_dict

    card = get_card(card)
    net = build_model(card.arch, num_classes=card.num_classes, in_chans=card.in_chans, **card.arch_kwargs)
    ckpt = card.checkpoint_path()
    load_into(net, load_state_dict(ckpt, sha256=card.sha256), ckpt)
    from tta.adapters.inputs import declare_input  # the input contract adapters check batches against
    from tta.engine.guard import declare_guard  # the card's guard settings, the guard's defaults there

    size = card.input_size[1:] if min(card.input_size[1:]) > 0 else None  # 0: any size
    model = declare_input(wrap_normalization(net, card.mean, card.std).to(device).eval(), size, (0.0, 1.0))
    return declare_guard(model, card.guard)


def load_weights(arch: str, path: str | os.PathLike[str], num_classes: int = 1000, in_chans: int = 3,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                 sha256: str | None = None, device: str | torch.device = "cpu", **arch_kwargs: Any) -> nn.Module:
    """Any timm/torchvision/built-in architecture with a local weights file, without writing a card."""
    card = ModelCard(name=Path(path).stem, arch=arch, num_classes=num_classes, checkpoint=str(Path(path).resolve()),
                     sha256=sha256, input_size=(in_chans, 0, 0), mean=mean, std=std, arch_kwargs=arch_kwargs)
    return load(card, device)
