"""Stream specs: YAML files in the repository's top-level ``streams/`` folder.

A spec names its data (a folder under the data root), the setting and the protocol choices:

    name: fmnist-c-continual
    dataset: fashion-mnist-c          # fashion-mnist-c | cifar10-c | cifar100-c | imagenet-c
    data: fashion-mnist-c             # folder under the data root ($TTA_DATA_DIR or <repo>/data)
    setting: continual                # continual | gradual | mixed
    corruptions: standard             # "standard" (STANDARD_ORDER) or a list
    severities: [5]
    reset: never                      # never (continual) | domain (reset_each_shift)
    order: shuffle                    # shuffle | file | dirichlet
    concentration: null               # Dirichlet concentration (order: dirichlet)
    first_from_5: false               # gradual: first corruption 5..1
    batch_size: 200
    n_per_domain: 2000                # null = every image
    seed: 1
    preset: cifar10                   # adapter config preset the engine applies (cifar10|cifar100|imagenet)

Folders: specs from $TTA_STREAMS_DIR or <repo>/streams; data from $TTA_DATA_DIR or <repo>/data.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tta.errors import ConfigError, DataNotFoundError
from tta.streams.base import Stream
from tta.streams.corruptions import CORRUPTIONS, STANDARD_ORDER
from tta.streams.datasets import CIFAR_C_LAYOUT, IMAGENET_C_LAYOUT, CorruptionArraySet, ImageNetCSet
from tta.streams.settings import ORDERS, RESETS, ContinualStream, GradualStream, MixedDomainStream

DEFAULT_SPEC = "fmnist-c-continual"
REPO_ROOT = Path(__file__).resolve().parents[2]
SETTINGS = ("continual", "gradual", "mixed")

#: dataset -> (layout kind, how to get it; {path} is the folder the spec expects)
DATASETS: dict[str, tuple[str, str]] = {
    "fashion-mnist-c": (
        "cifar-c",
        "create it (about 2 CPU-minutes: 15 corruptions x 5 severities x 10,000 images) with: "
        "tta make-c --dataset fashion-mnist --out {path}",
    ),
    "cifar10-c": (
        "cifar-c",
        "download CIFAR-10-C.tar from https://zenodo.org/record/2535967 and extract it so that {path} holds "
        "the .npy files",
    ),
    "cifar100-c": (
        "cifar-c",
        "download CIFAR-100-C.tar from https://zenodo.org/record/3555552 and extract it so that {path} holds "
        "the .npy files",
    ),
    "imagenet-c": (
        "imagenet-c",
        "download the ImageNet-C archives (blur, digital, extra, noise, weather) from "
        "https://zenodo.org/record/2235448 and extract them into {path}",
    ),
}


def streams_dir() -> Path:
    return Path(os.environ.get("TTA_STREAMS_DIR", REPO_ROOT / "streams"))


def data_root() -> Path:
    return Path(os.environ.get("TTA_DATA_DIR", REPO_ROOT / "data"))


@dataclass
class StreamSpec:
    """A stream recipe; `build()` turns it into a `Stream` (see the module docstring for the fields)."""

    name: str
    dataset: str
    data: str
    setting: str = "continual"
    corruptions: tuple[str, ...] = STANDARD_ORDER
    severities: tuple[int, ...] = (5,)
    reset: str = "never"
    order: str = "shuffle"
    concentration: float | None = None
    first_from_5: bool = False
    batch_size: int = 200
    n_per_domain: int | None = None
    seed: int = 1
    preset: str | None = None
    image_list: str | None = None
    resize_crop: tuple[int, int] | None = None
    description: str = ""
    path: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ConfigError(f"spec {self.name}: unknown dataset {self.dataset!r}; known: {', '.join(DATASETS)}")
        if self.setting not in SETTINGS:
            raise ConfigError(f"spec {self.name}: setting must be one of {SETTINGS}, got {self.setting!r}")
        if self.corruptions == "standard":
            self.corruptions = STANDARD_ORDER
        self.corruptions = tuple(self.corruptions)
        unknown = [c for c in self.corruptions if c not in CORRUPTIONS]
        if unknown:
            raise ConfigError(f"spec {self.name}: unknown corruptions {unknown}")
        self.severities = tuple(int(s) for s in self.severities)
        if not self.severities or any(s not in range(1, 6) for s in self.severities):
            raise ConfigError(f"spec {self.name}: severities must be in 1..5, got {self.severities}")
        if self.reset not in RESETS:
            raise ConfigError(f"spec {self.name}: reset must be one of {RESETS}, got {self.reset!r}")
        if self.order not in ORDERS:
            raise ConfigError(f"spec {self.name}: order must be one of {ORDERS}, got {self.order!r}")
        if self.order == "dirichlet" and not (self.concentration and self.concentration > 0):
            raise ConfigError(f"spec {self.name}: order 'dirichlet' needs a concentration > 0")
        if self.resize_crop is not None:
            self.resize_crop = tuple(self.resize_crop)

    @property
    def layout(self) -> str:
        return DATASETS[self.dataset][0]

    def needed_severities(self) -> tuple[int, ...]:
        return (1, 2, 3, 4, 5) if self.setting == "gradual" else self.severities

    def data_path(self, data_dir: str | os.PathLike[str] | None = None) -> Path:
        """The spec's data folder. `data_dir` is a data root holding ``<data>/``, or the set's folder itself."""
        if data_dir is None:
            return data_root() / self.data
        d = Path(data_dir)
        if (d / self.data).is_dir():
            return d / self.data
        if (d / "labels.npy").is_file() or (d.is_dir() and any((d / c).is_dir() for c in self.corruptions)):
            return d
        return d / self.data

    def how_to_get(self, path: Path) -> str:
        return DATASETS[self.dataset][1].format(path=path)

    def _open(self, path: Path):
        layout_text = CIFAR_C_LAYOUT if self.layout == "cifar-c" else IMAGENET_C_LAYOUT
        if not path.is_dir():
            raise DataNotFoundError(
                f"stream spec '{self.name}' needs the {self.dataset} set at {path} ({layout_text}), which does not "
                f"exist; {self.how_to_get(path)}"
            )
        try:
            if self.layout == "cifar-c":
                data = CorruptionArraySet(path)
                missing_sev = [s for s in self.needed_severities() if s not in data.severities]
                if missing_sev:
                    raise DataNotFoundError(f"{path} holds severities {list(data.severities)}, not {missing_sev}")
            else:
                image_list = self.image_list
                if image_list is not None and not Path(image_list).is_absolute():
                    image_list = path / image_list
                data = ImageNetCSet(path, image_list=image_list, resize_crop=self.resize_crop)
            missing = [c for c in self.corruptions if c not in data.corruptions]
            if missing:
                raise DataNotFoundError(f"{path} lacks the corruptions {missing}")
        except DataNotFoundError as exc:
            raise DataNotFoundError(f"stream spec '{self.name}': {exc}; {self.how_to_get(path)}") from exc
        return data

    def build(
        self,
        batch_size: int | None = None,
        n_per_domain: int | None = None,
        seed: int | None = None,
        data_dir: str | os.PathLike[str] | None = None,
    ) -> Stream:
        """The stream this spec describes; arguments override the spec's values."""
        bs = int(batch_size or self.batch_size)
        n = n_per_domain if n_per_domain is not None else self.n_per_domain
        sd = self.seed if seed is None else int(seed)
        data = self._open(self.data_path(data_dir))
        multi_sev = len(self.severities) > 1
        domains = [
            (f"{c}@{s}" if multi_sev else c, data.domain(c, s)) for s in self.severities for c in self.corruptions
        ]
        if self.setting == "continual":
            stream: Stream = ContinualStream(
                domains, bs, n_per_domain=n, order=self.order, concentration=self.concentration, seed=sd, reset=self.reset
            )
        elif self.setting == "gradual":
            by_corruption = {c: {s: data.domain(c, s) for s in (1, 2, 3, 4, 5)} for c in self.corruptions}
            stream = GradualStream(
                by_corruption, bs, first_from_5=self.first_from_5, n_per_domain=n, order=self.order,
                concentration=self.concentration, seed=sd, reset=self.reset,
            )
        else:
            stream = MixedDomainStream(domains, bs, n_per_domain=n, seed=sd, reset=self.reset)
        stream.spec = self
        return stream


_FIELDS = {f.name for f in dataclasses.fields(StreamSpec)} - {"path"}


def list_specs() -> list[str]:
    """Names of the specs in the streams folder."""
    folder = streams_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def load_spec(name_or_path: str | os.PathLike[str] = DEFAULT_SPEC) -> StreamSpec:
    """Load a spec by name (a file ``<name>.yaml`` in the streams folder) or by path."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.is_file():
        path = candidate
    else:
        path = streams_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(list_specs()) or "none"
        raise DataNotFoundError(f"stream spec {name_or_path!r} not found (looked for {path}); known specs: {known}")
    try:
        raw: Any = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a stream spec is a YAML mapping")
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        raise ConfigError(f"{path}: unknown spec keys {unknown}; known: {sorted(_FIELDS)}")
    raw.setdefault("name", path.stem)
    for key in ("dataset", "data"):
        if key not in raw:
            raise ConfigError(f"{path}: missing required key {key!r}")
    return StreamSpec(**raw, path=path)
