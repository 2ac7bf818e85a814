"""Stream specs: YAML files in the repository's top-level ``streams/`` folder.

A spec names its data (a folder under the data root), the setting and the protocol choices:

    name: fmnist-c-continual
    dataset: fashion-mnist-c          # fashion-mnist-c | cifar10-c | cifar100-c | imagenet-c
    data: fashion-mnist-c             # folder under the data root (`tta.paths.data_root()`)
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

Specs are found by name in the search order of `tta.paths` ($TTA_STREAMS_DIR, ./streams, the per-user
folder, the shipped specs); data under `tta.paths.data_root()` ($TTA_DATA_DIR, else the per-user data
folder). Importing this module needs neither torch nor numpy (`tta list` reads specs).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

import yaml

from tta import paths
from tta.errors import ConfigError, DataNotFoundError
from tta.streams.names import CORRUPTIONS, ORDERS, RESETS, STANDARD_ORDER

if TYPE_CHECKING:
    from tta.streams.base import Stream

DEFAULT_SPEC = "fmnist-c-continual"
SETTINGS = ("continual", "gradual", "mixed")
SPEC_SUFFIXES = (".yaml", ".yml")

#: dataset -> (layout kind, number of classes, how to get it; {path} is the folder the spec expects)
DATASETS: dict[str, tuple[str, int, str]] = {
    "fashion-mnist-c": (
        "cifar-c",
        10,
        "create it (about 2 CPU-minutes: 15 corruptions x 5 severities x 10,000 images) with: "
        "tta make-c --dataset fashion-mnist --out {path}",
    ),
    "cifar10-c": (
        "cifar-c",
        10,
        "download CIFAR-10-C.tar from https://zenodo.org/record/2535967 and extract it so that {path} holds "
        "the .npy files",
    ),
    "cifar100-c": (
        "cifar-c",
        100,
        "download CIFAR-100-C.tar from https://zenodo.org/record/3555552 and extract it so that {path} holds "
        "the .npy files",
    ),
    "imagenet-c": (
        "imagenet-c",
        1000,
        "download the ImageNet-C archives (blur, digital, extra, noise, weather) from "
        "https://zenodo.org/record/2235448 and extract them into {path}",
    ),
}


def data_root() -> Path:
    """`tta.paths.data_root()`: $TTA_DATA_DIR, else the per-user data folder."""
    return paths.data_root()


def _int(value: Any, what: str, minimum: int, allow_none: bool = False) -> int | None:
    """A YAML integer >= minimum (not a bool, float or string), else a ConfigError naming `what`."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "null or " if allow_none else ""
        raise ConfigError(f"{what} must be {kind}an integer >= {minimum}, got {value!r}")
    return value


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
        where = f"spec {self.name}"
        for key in ("name", "dataset", "data", "setting", "reset", "order", "description"):
            if not isinstance(getattr(self, key), str):
                raise ConfigError(f"{where}: {key} must be a string, got {getattr(self, key)!r}")
        if self.dataset not in DATASETS:
            raise ConfigError(f"{where}: unknown dataset {self.dataset!r}; known: {', '.join(DATASETS)}")
        if self.setting not in SETTINGS:
            raise ConfigError(f"{where}: setting must be one of {SETTINGS}, got {self.setting!r}")
        if self.corruptions == "standard":
            self.corruptions = STANDARD_ORDER
        if isinstance(self.corruptions, str) or not isinstance(self.corruptions, (list, tuple)):
            raise ConfigError(f"{where}: corruptions must be 'standard' or a list of names, got {self.corruptions!r}")
        self.corruptions = tuple(self.corruptions)
        unknown = [c for c in self.corruptions if c not in CORRUPTIONS]
        if unknown or not self.corruptions:
            raise ConfigError(f"{where}: unknown corruptions {unknown}; known: {', '.join(CORRUPTIONS)}"
                              if unknown else f"{where}: corruptions is empty")
        if not isinstance(self.severities, (list, tuple)):
            raise ConfigError(f"{where}: severities must be a list such as [5] or [1, 2, 3, 4, 5], "
                              f"got {self.severities!r}")
        self.severities = tuple(_int(s, f"{where}: each severity", 1) for s in self.severities)  # type: ignore[misc]
        if not self.severities or any(s not in range(1, 6) for s in self.severities):
            raise ConfigError(f"{where}: severities must be in 1..5, got {self.severities}")
        self.batch_size = _int(self.batch_size, f"{where}: batch_size", 1)  # type: ignore[assignment]
        self.n_per_domain = _int(self.n_per_domain, f"{where}: n_per_domain", 1, allow_none=True)
        self.seed = _int(self.seed, f"{where}: seed", 0)  # type: ignore[assignment]
        if not isinstance(self.first_from_5, bool):
            raise ConfigError(f"{where}: first_from_5 must be true or false, got {self.first_from_5!r}")
        if self.concentration is not None and (isinstance(self.concentration, bool)
                                               or not isinstance(self.concentration, (int, float))):
            raise ConfigError(f"{where}: concentration must be a number, got {self.concentration!r}")
        for key in ("preset", "image_list"):
            if getattr(self, key) is not None and not isinstance(getattr(self, key), str):
                raise ConfigError(f"{where}: {key} must be a string or null, got {getattr(self, key)!r}")
        if self.reset not in RESETS:
            raise ConfigError(f"spec {self.name}: reset must be one of {RESETS}, got {self.reset!r}")
        if self.order not in ORDERS:
            raise ConfigError(f"spec {self.name}: order must be one of {ORDERS}, got {self.order!r}")
        if self.order == "dirichlet" and not (self.concentration and self.concentration > 0):
            raise ConfigError(f"spec {self.name}: order 'dirichlet' needs a concentration > 0")
        if self.resize_crop is not None:
            if not isinstance(self.resize_crop, (list, tuple)) or len(self.resize_crop) != 2:
                raise ConfigError(f"{where}: resize_crop must be [resize, crop], got {self.resize_crop!r}")
            self.resize_crop = tuple(_int(v, f"{where}: resize_crop", 1) for v in self.resize_crop)  # type: ignore[assignment]

    @property
    def layout(self) -> str:
        return DATASETS[self.dataset][0]

    @property
    def num_classes(self) -> int:
        """Classes of the spec's dataset; every label of its data must lie in [0, num_classes)."""
        return DATASETS[self.dataset][1]

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
        return DATASETS[self.dataset][2].format(path=path)

    def _open(self, path: Path):
        from tta.streams.datasets import CIFAR_C_LAYOUT, IMAGENET_C_LAYOUT, CorruptionArraySet, ImageNetCSet

        layout_text = CIFAR_C_LAYOUT if self.layout == "cifar-c" else IMAGENET_C_LAYOUT
        if not path.is_dir():
            raise DataNotFoundError(
                f"stream spec '{self.name}' needs the {self.dataset} set at {path} ({layout_text}), which does not "
                f"exist; {self.how_to_get(path)}"
            )
        try:
            if self.layout == "cifar-c":
                data = CorruptionArraySet(path, num_classes=self.num_classes)
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
        from tta.streams.settings import ContinualStream, GradualStream, MixedDomainStream

        bs = _int(self.batch_size if batch_size is None else batch_size, "batch_size", 1)
        n = _int(self.n_per_domain if n_per_domain is None else n_per_domain, "n_per_domain", 1, allow_none=True)
        sd = _int(self.seed if seed is None else seed, "seed", 0)
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
        stream.dataset = self.dataset
        # log labels as the reference CTTA library writes them: corruption + severity ("fog5")
        stream.domain_labels = {name: name.replace("@", "") if "@" in name else f"{name}{self.severities[0]}"
                                for name in stream.domains}
        return stream


_FIELDS = {f.name for f in dataclasses.fields(StreamSpec)} - {"path"}


def spec_entries() -> dict[str, paths.Found]:
    """Every spec in the search order of `tta.paths`, by name, with where it was found."""
    return paths.list_entries("streams", SPEC_SUFFIXES)


def list_specs() -> list[str]:
    """Names of the specs found (see `spec_entries`)."""
    return list(spec_entries())


def load_spec(name_or_path: str | os.PathLike[str] = DEFAULT_SPEC) -> StreamSpec:
    """Load a spec by name (``<name>.yaml`` in the search order of `tta.paths`) or by path."""
    candidate = Path(name_or_path)
    if candidate.suffix in SPEC_SUFFIXES or candidate.is_file():
        path = candidate
        if not path.is_file():
            raise DataNotFoundError(f"stream spec file {path} does not exist")
    else:
        found = paths.find_entry("streams", str(name_or_path), SPEC_SUFFIXES)
        if found is None:
            known = ", ".join(list_specs()) or "none"
            raise DataNotFoundError(f"stream spec {str(name_or_path)!r} not found in {paths.describe_search('streams')}; "
                                    f"known specs: {known}")
        path = found.path
    try:
        raw: Any = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a stream spec is a YAML mapping")
    unknown = sorted(str(k) for k in set(raw) - _FIELDS)
    if unknown:
        raise ConfigError(f"{path}: unknown spec keys {unknown}; known: {sorted(_FIELDS)}")
    raw.setdefault("name", path.stem)
    for key in ("dataset", "data"):
        if key not in raw:
            raise ConfigError(f"{path}: missing required key {key!r}")
    return StreamSpec(**raw, path=path)
