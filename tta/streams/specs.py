"""Stream specs: YAML files in the repository's top-level ``streams/`` folder.

A spec names its data (a folder under the data root), the setting and the protocol choices:

    name: fmnist-c-continual
    dataset: fashion-mnist-c          # fashion-mnist-c | cifar10-c | cifar100-c | imagenet-c
    data: fashion-mnist-c             # folder under the data root (`tta.paths.data_root()`)
    setting: continual                # continual | gradual | mixed | recurring | ccc
    corruptions: standard             # "standard" (STANDARD_ORDER) or a list
    severities: [5]
    reset: never                      # never (continual) | domain (reset_each_shift) | every N (batches)
    order: shuffle                    # shuffle | file | dirichlet
    concentration: null               # Dirichlet concentration (order: dirichlet)
    first_from_5: false               # gradual: first corruption 5..1
    batch_size: 200
    n_per_domain: 2000                # null = every image
    seed: 1
    preset: cifar10                   # adapter config preset the engine applies (cifar10|cifar100|imagenet)

Long streams (`setting: recurring` / `ccc`, see `tta.streams.generated` and `tta.streams.ccc`):

    recurrences: 20                   # recurring: the domain sequence repeated this many times
    difficulty: medium                # ccc: easy | medium | hard (or target_accuracy: %)
    speed: 2000                       # ccc: images per 0.25 of severity change (CCC: 1000, 2000, 5000)
    length: 1000000                   # ccc: images in the stream
    calibration: fmnist-ccc.calibration.json   # ccc: `tta calibrate-ccc` output, relative to the spec

With the clean dataset ``fashion-mnist`` (the official idx files, `tta.streams.fashion_mnist`) the
corruptions are generated on the fly, batch by batch (nothing stored, any length); a recurring
stream over a stored "-C" set repeats its stored domains.

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
from tta.streams.names import CORRUPTIONS, DIFFICULTIES, ORDERS, STANDARD_ORDER, check_reset

if TYPE_CHECKING:
    from tta.streams.base import Stream

DEFAULT_SPEC = "fmnist-c-continual"
SETTINGS = ("continual", "gradual", "mixed", "recurring", "ccc")
#: clean datasets: the corruptions of their streams are generated on the fly
CLEAN_DATASETS = ("fashion-mnist",)
SPEC_SUFFIXES = (".yaml", ".yml")

#: dataset -> (layout kind, number of classes, how to get it; {path} is the folder the spec expects)
DATASETS: dict[str, tuple[str, int, str]] = {
    "fashion-mnist": (
        "clean",
        10,
        "install the Debian package dataset-fashion-mnist (apt-get install -y dataset-fashion-mnist) or set "
        "TTA_FASHION_MNIST_DIR to a folder holding the four official idx .gz files",
    ),
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
    data: str | None = None
    setting: str = "continual"
    corruptions: tuple[str, ...] = STANDARD_ORDER
    severities: tuple[int, ...] = (5,)
    reset: str | int = "never"
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
    recurrences: int = 1
    difficulty: str | None = None
    target_accuracy: float | None = None
    speed: int = 2000
    length: int | None = None
    calibration: str | None = None
    path: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        where = f"spec {self.name}"
        for key in ("name", "dataset", "setting", "order", "description"):
            if not isinstance(getattr(self, key), str):
                raise ConfigError(f"{where}: {key} must be a string, got {getattr(self, key)!r}")
        for key in ("data", "difficulty", "calibration"):
            if getattr(self, key) is not None and not isinstance(getattr(self, key), str):
                raise ConfigError(f"{where}: {key} must be a string or null, got {getattr(self, key)!r}")
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
        try:
            self.reset = check_reset(self.reset)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if self.order not in ORDERS:
            raise ConfigError(f"spec {self.name}: order must be one of {ORDERS}, got {self.order!r}")
        if self.order == "dirichlet" and not (self.concentration and self.concentration > 0):
            raise ConfigError(f"spec {self.name}: order 'dirichlet' needs a concentration > 0")
        if self.resize_crop is not None:
            if not isinstance(self.resize_crop, (list, tuple)) or len(self.resize_crop) != 2:
                raise ConfigError(f"{where}: resize_crop must be [resize, crop], got {self.resize_crop!r}")
            self.resize_crop = tuple(_int(v, f"{where}: resize_crop", 1) for v in self.resize_crop)  # type: ignore[assignment]
        self._check_long_stream_fields()

    def _check_long_stream_fields(self) -> None:
        """The fields of the generated settings (recurring, ccc) and of clean datasets."""
        def positive_int(key: str, value: object) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"spec {self.name}: {key} must be an integer >= 1, got {value!r}")

        clean = self.dataset in CLEAN_DATASETS
        if self.data is None and not clean:
            raise ConfigError(f"spec {self.name}: missing required key 'data' (the {self.dataset} folder)")
        if clean and self.setting not in ("recurring", "ccc"):
            raise ConfigError(f"spec {self.name}: dataset {self.dataset} is clean; its settings are recurring and "
                              "ccc (corruptions generated on the fly); stored sets use fashion-mnist-c")
        positive_int("recurrences", self.recurrences)
        positive_int("speed", self.speed)
        if self.length is not None:
            positive_int("length", self.length)
        if self.setting == "recurring" and clean and self.order != "shuffle":
            raise ConfigError(f"spec {self.name}: generated recurring streams draw images in shuffled order only")
        if self.setting != "ccc":
            return
        if not clean:
            raise ConfigError(f"spec {self.name}: ccc generates its corruptions; use a clean dataset "
                              f"({', '.join(CLEAN_DATASETS)})")
        if self.target_accuracy is None:
            if self.difficulty not in DIFFICULTIES:
                raise ConfigError(f"spec {self.name}: ccc needs difficulty ({', '.join(DIFFICULTIES)}) or "
                                  f"target_accuracy, got difficulty {self.difficulty!r}")
        elif isinstance(self.target_accuracy, bool) or not isinstance(self.target_accuracy, (int, float)) or \
                not 0 < self.target_accuracy < 100:
            raise ConfigError(f"spec {self.name}: target_accuracy must be a percentage in (0, 100), "
                              f"got {self.target_accuracy!r}")
        if not self.calibration:
            raise ConfigError(f"spec {self.name}: ccc needs a calibration file (tta calibrate-ccc)")
        if self.length is None:
            raise ConfigError(f"spec {self.name}: ccc needs a length (images)")

    @property
    def target(self) -> float:
        """ccc: the source-model accuracy (%) the stream holds."""
        return float(self.target_accuracy) if self.target_accuracy is not None else DIFFICULTIES[self.difficulty]

    def calibration_path(self) -> Path:
        path = Path(self.calibration)
        if not path.is_absolute() and self.path is not None:
            path = Path(self.path).parent / path
        return path

    def with_overrides(self, assignments: list[str]) -> "StreamSpec":
        """A copy with ``key=value`` overrides (CLI ``--stream-set``; values read as YAML scalars/lists)."""
        changes: dict[str, Any] = {}
        for item in assignments:
            if "=" not in item:
                raise ConfigError(f"stream setting: expected key=value, got {item!r}")
            key, raw = (part.strip() for part in item.split("=", 1))
            if key not in _FIELDS or key == "name":
                raise ConfigError(f"unknown stream spec key {key!r}; known: {sorted(_FIELDS - {'name'})}")
            try:
                changes[key] = yaml.safe_load(raw)
            except yaml.YAMLError as exc:
                raise ConfigError(f"stream setting {item!r}: {exc}") from exc
        return dataclasses.replace(self, **changes) if changes else self

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
        if self.layout == "clean":
            stream = self._build_generated(bs, n, sd, data_dir)
            stream.spec = self
            return stream
        data = self._open(self.data_path(data_dir))
        multi_sev = len(self.severities) > 1
        domains = [
            (f"{c}@{s}" if multi_sev else c, data.domain(c, s)) for s in self.severities for c in self.corruptions
        ]
        if self.setting in ("continual", "recurring"):
            stream: Stream = ContinualStream(
                domains * self.recurrences, bs, n_per_domain=n, order=self.order, concentration=self.concentration,
                seed=sd, reset=self.reset,
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


    def _build_generated(self, bs: int, n: int | None, seed: int, data_dir: str | os.PathLike[str] | None) -> Stream:
        """recurring / ccc over the clean set, corrupted on the fly (`tta.streams.generated`)."""
        from tta.streams.fashion_mnist import load_fashion_mnist
        from tta.streams.generated import GeneratedStream, recurring_plans

        if self.data is None:  # the default location (Debian package / $TTA_FASHION_MNIST_DIR) or data_dir itself
            folder = None if data_dir is None else Path(data_dir)
        else:
            folder = self.data_path(data_dir)
            if data_dir is not None and not folder.is_dir():
                folder = Path(data_dir)
        images, labels = load_fashion_mnist("test", folder)
        if self.setting == "recurring":
            if n is None:
                raise ConfigError(f"spec {self.name}: a generated recurring stream needs n_per_domain")
            multi = len(self.severities) > 1
            plans = [
                dataclasses.replace(p, domain=f"{p.domain}@{s}") if multi else p
                for s in self.severities
                for p in recurring_plans(self.corruptions, s, n, 1, bs)
            ] * self.recurrences
            return GeneratedStream(images, labels, plans, seed=seed, reset=self.reset)
        from tta.streams.ccc import CCCCalibration, ccc_plans

        if n is not None and n != self.n_per_domain:
            raise ConfigError(f"spec {self.name}: a ccc stream has no domains of fixed size; set its length "
                              "(--stream-set length=N) instead of images per domain")
        calibration = CCCCalibration.load(self.calibration_path())
        plans, transitions = ccc_plans(calibration, target=self.target, speed=self.speed, length=self.length,
                                       batch_size=bs, seed=seed)
        stream = GeneratedStream(images, labels, plans, seed=seed, reset=self.reset)
        stream.transitions = transitions
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
    if "dataset" not in raw:
        raise ConfigError(f"{path}: missing required key 'dataset'")
    return StreamSpec(**raw, path=path)
