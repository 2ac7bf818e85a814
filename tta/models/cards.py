"""Model cards: YAML files in the repository's top-level `models/` folder describing a checkpoint.

A card names the architecture, classes, input size, input normalisation (applied inside the loaded
model), the checkpoint file (relative to the card) and its SHA-256, how to read pooled features,
the measured clean accuracy, the CoTTA confidence threshold and the exact command that produced
the checkpoint. `load(card)` returns the model in eval mode taking float [0, 1] NCHW images.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from tta.errors import DataNotFoundError
from tta.models.builders import build_model
from tta.models.checkpoint import load_into, load_state_dict
from tta.models.normalize import Normalized

MODELS_ENV = "TTA_MODELS_DIR"
DEFAULT_CARD = "resnet20-fmnist"
VIT_CARD = "vit-fmnist"
CARD_SUFFIXES = (".yaml", ".yml")


def models_dir() -> Path:
    """`$TTA_MODELS_DIR`, else the repository's top-level `models/` folder."""
    env = os.environ.get(MODELS_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "models"


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
    preprocessing: str | None = None  # e.g. "Res256Crop224" for ImageNet checkpoints
    training: dict[str, Any] = field(default_factory=dict)
    command: str | None = None
    notes: str | None = None
    path: Path | None = field(default=None, compare=False)  # where the card was read from

    @property
    def in_chans(self) -> int:
        return self.input_size[0]

    def checkpoint_path(self) -> Path:
        ckpt = Path(self.checkpoint)
        if ckpt.is_absolute():
            return ckpt
        return (self.path.parent if self.path is not None else models_dir()) / ckpt

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
        if "input_size" in data:
            size = tuple(int(v) for v in data["input_size"])
            if len(size) != 3:
                raise DataNotFoundError(f"model card {where}: input_size must be [C, H, W], got {data['input_size']}")
            data["input_size"] = size
        mean, std = norm.get("mean"), norm.get("std")
        if (mean is None) != (std is None) or (mean is not None and len(mean) != len(std)):
            raise DataNotFoundError(f"model card {where}: normalization needs both mean and std of equal length")
        return cls(**data, mean=None if mean is None else tuple(mean), std=None if std is None else tuple(std), path=path)

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, width=120))
        self.path = path
        return path


def _card_path(name_or_path: str | os.PathLike[str]) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix in CARD_SUFFIXES:
        if candidate.is_file():
            return candidate
        raise DataNotFoundError(f"model card file {candidate} does not exist")
    for suffix in CARD_SUFFIXES:
        path = models_dir() / f"{name_or_path}{suffix}"
        if path.is_file():
            return path
    raise DataNotFoundError(
        f"unknown model card {str(name_or_path)!r}: no {name_or_path}.yaml in {models_dir()} "
        f"(available: {', '.join(list_cards()) or 'none'})"
    )


def get_card(card: str | os.PathLike[str] | ModelCard) -> ModelCard:
    """A card by name (`models/<name>.yaml`), by path to a YAML file, or passed through."""
    if isinstance(card, ModelCard):
        return card
    path = _card_path(card)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise DataNotFoundError(f"model card {path} is not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise DataNotFoundError(f"model card {path} must be a YAML mapping")
    return ModelCard.from_dict(data, path)


def list_cards() -> list[str]:
    root = models_dir()
    if not root.is_dir():
        return []
    return sorted(p.stem for p in root.iterdir() if p.suffix in CARD_SUFFIXES)


def wrap_normalization(net: nn.Module, mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> nn.Module:
    return net if mean is None else Normalized(net, mean, std)


def load(card: str | os.PathLike[str] | ModelCard, device: str | torch.device = "cpu") -> nn.Module:
    """Build the card's architecture, verify and load its checkpoint; eval mode, [0, 1] NCHW inputs."""
    card = get_card(card)
    net = build_model(card.arch, num_classes=card.num_classes, in_chans=card.in_chans, **card.arch_kwargs)
    ckpt = card.checkpoint_path()
    load_into(net, load_state_dict(ckpt, sha256=card.sha256), ckpt)
    return wrap_normalization(net, card.mean, card.std).to(device).eval()


def load_weights(arch: str, path: str | os.PathLike[str], num_classes: int = 1000, in_chans: int = 3,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                 sha256: str | None = None, device: str | torch.device = "cpu", **arch_kwargs: Any) -> nn.Module:
    """Any timm/torchvision/built-in architecture with a local weights file, without writing a card."""
    card = ModelCard(name=Path(path).stem, arch=arch, num_classes=num_classes, checkpoint=str(Path(path).resolve()),
                     sha256=sha256, input_size=(in_chans, 0, 0), mean=mean, std=std, arch_kwargs=arch_kwargs)
    return load(card, device)
