"""Matrix plans: which cards, streams, adapters, seeds and stream sizes a results table is made of.

A plan is a YAML file of parts; every part is a cross product, and the plan is the union of its
parts' cells (a cell repeated by two parts runs once):

    name: fmnist
    cost: {stream: fmnist-c-continual, limit: 400}     # where step cost and memory are measured
    parts:
      - models: [resnet20-fmnist]
        streams: [fmnist-c-continual, fmnist-c-reset-each-shift, fmnist-c-gradual, fmnist-c-mixed,
                  fmnist-c-dirichlet]
        adapters: [source, bn, tent]
        seeds: [1, 2, 3]
        limit: 2000                                    # images per domain; "full" = the whole set; null = the spec's
      - models: [resnet20-fmnist]
        streams: [fmnist-c-continual]
        adapters: [cotta]
        seeds: [1]
        limit: 2000
        variant: tuned                                 # a row of its own: "cotta (tuned)"
        preset: tuned                                  # the tuned preset (`tta.protocol.presets`)
        set: [ap=0.8]                                  # config overrides (key=value), as `tta run --set`
        cost: {limit: 200}                             # this part's cost cells on fewer images (or false: none)

A cell is one run: (card, stream, adapter, variant, images per domain, seed). Every part also asks for
one cost cell per (card, adapter, variant): the step cost relative to the source forward and the peak
memory of a step (`tta.protocol.cost`), measured on the plan's ``cost`` stream.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tta.errors import ConfigError, DataNotFoundError

FULL = "full"
#: default stream and size of the cost cells: two batches of 200 from every domain of the default stream
DEFAULT_COST = {"stream": "fmnist-c-continual", "limit": 400}
_PART_KEYS = {"name", "models", "streams", "adapters", "seeds", "limit", "variant", "preset", "set", "cost"}


@dataclass(frozen=True)
class Cell:
    """One run of a plan. ``kind`` "stream": `adapter` over `stream` with `seed` and `limit` images
    per domain (None: the spec's size, "full": every image); ``kind`` "cost": step cost and memory of
    `adapter` on `model` (stream/limit: where the batches come from; seed: the adapter's)."""

    kind: str
    model: str
    adapter: str
    stream: str
    seed: int
    limit: int | str | None = None
    variant: str = ""
    preset: str | None = None
    overrides: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """The table row: ``adapter`` or ``adapter (variant)``."""
        return f"{self.adapter} ({self.variant})" if self.variant else self.adapter

    @property
    def key(self) -> str:
        """A relative folder for the cell's files, unique within a plan."""
        row = self.adapter + (f"+{_slug(self.variant)}" if self.variant else "")
        size = "spec" if self.limit is None else f"n{self.limit}"
        if self.kind == "cost":
            return f"{self.model}/_cost/{row}/{self.stream}-{size}-seed{self.seed}"
        return f"{self.model}/{self.stream}/{row}/{size}-seed{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "overrides": list(self.overrides)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Cell":
        return cls(**{**data, "overrides": tuple(data.get("overrides", ()))})

    def digest(self) -> str:
        """Identity of the cell's definition (a stored result is reused only for the same definition)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Part:
    name: str
    models: list[str]
    streams: list[str]
    adapters: list[str]
    seeds: list[int]
    limit: int | str | None = None
    variant: str = ""
    preset: str | None = None
    overrides: tuple[str, ...] = ()
    cost: bool = True
    cost_limit: int | str | None = None  # None: the plan's

    def cells(self, cost_stream: str, cost_limit: int | str | None) -> list[Cell]:
        common = {"variant": self.variant, "preset": self.preset, "overrides": self.overrides}
        out = [Cell("stream", m, a, s, seed, self.limit, **common)
               for m in self.models for s in self.streams for a in self.adapters for seed in self.seeds]
        if self.cost:
            limit = cost_limit if self.cost_limit is None else self.cost_limit
            out += [Cell("cost", m, a, cost_stream, min(self.seeds), limit, **common)
                    for m in self.models for a in self.adapters]
        return out


@dataclass
class Plan:
    name: str
    parts: list[Part]
    cost_stream: str = DEFAULT_COST["stream"]
    cost_limit: int | str | None = DEFAULT_COST["limit"]
    path: Path | None = field(default=None, compare=False)

    def cells(self) -> list[Cell]:
        """Every cell once, in plan order (stream cells of the parts, then their cost cells)."""
        seen: dict[str, Cell] = {}
        for part in self.parts:
            for cell in part.cells(self.cost_stream, self.cost_limit):
                if seen.setdefault(cell.key, cell) != cell:
                    raise ConfigError(f"plan {self.name}: two parts define {cell.key} differently (preset or set "
                                      f"values); give the variants different names")
        return list(seen.values())

    def select(self, only: list[str]) -> "Plan":
        """The plan restricted to the parts named in `only` (unknown names are an error)."""
        if not only:
            return self
        unknown = sorted(set(only) - {p.name for p in self.parts})
        if unknown:
            raise ConfigError(f"plan {self.name}: no part named {unknown}; parts: {[p.name for p in self.parts]}")
        return Plan(self.name, [p for p in self.parts if p.name in only], self.cost_stream, self.cost_limit, self.path)


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in text)


def _names(part: str, key: str, value: Any) -> list[str]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"plan part {part}: {key} must be a non-empty list of names, got {value!r}")
    return list(dict.fromkeys(value))


def _limit(where: str, value: Any) -> int | str | None:
    if value is None or value == FULL:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: limit must be an integer >= 1, 'full' or null, got {value!r}")
    return value


def parse_plan(raw: Any, name: str = "plan", path: Path | None = None) -> Plan:
    """A `Plan` from its YAML content (validated: names, seeds, sizes; adapters and specs are checked
    when the cells run)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("parts"), list) or not raw["parts"]:
        raise ConfigError(f"{name}: a plan is a mapping with a non-empty list 'parts'")
    unknown = sorted(set(raw) - {"name", "parts", "cost"})
    if unknown:
        raise ConfigError(f"{name}: unknown plan keys {unknown}; known: cost, name, parts")
    cost = {**DEFAULT_COST, **(raw.get("cost") or {})}
    if set(cost) - {"stream", "limit"}:
        raise ConfigError(f"{name}: cost takes 'stream' and 'limit', got {sorted(cost)}")
    parts: list[Part] = []
    for i, item in enumerate(raw["parts"]):
        if not isinstance(item, dict):
            raise ConfigError(f"{name}: part {i + 1} is not a mapping")
        label = str(item.get("name", f"part{i + 1}"))
        bad = sorted(set(item) - _PART_KEYS)
        if bad:
            raise ConfigError(f"{name}: part {label}: unknown keys {bad}; known: {sorted(_PART_KEYS)}")
        seeds = item.get("seeds", [1])
        if not isinstance(seeds, list) or not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0
                                                           for s in seeds):
            raise ConfigError(f"{name}: part {label}: seeds must be a non-empty list of integers >= 0, got {seeds!r}")
        overrides = item.get("set", [])
        if isinstance(overrides, str):
            overrides = [overrides]
        if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
            raise ConfigError(f"{name}: part {label}: set must be a list of key=value strings, got {overrides!r}")
        cost_item = item.get("cost", True)
        if not isinstance(cost_item, bool) and not (isinstance(cost_item, dict) and set(cost_item) <= {"limit"}):
            raise ConfigError(f"{name}: part {label}: cost must be true, false or {{limit: N}}, got {cost_item!r}")
        variant = item.get("variant", "") or ""
        if (item.get("preset") or overrides) and not variant:
            raise ConfigError(f"{name}: part {label}: a part with a preset or set values needs a variant name "
                              "(its own table row)")
        parts.append(Part(
            name=label,
            models=_names(label, "models", item.get("models")),
            streams=_names(label, "streams", item.get("streams")),
            adapters=_names(label, "adapters", item.get("adapters")),
            seeds=list(dict.fromkeys(seeds)),
            limit=_limit(f"{name}: part {label}", item.get("limit")),
            variant=str(variant),
            preset=item.get("preset"),
            overrides=tuple(overrides),
            cost=bool(cost_item),
            cost_limit=_limit(f"{name}: part {label}: cost", cost_item.get("limit")) if isinstance(cost_item, dict)
            else None,
        ))
    names = [p.name for p in parts]
    if len(set(names)) != len(names):
        raise ConfigError(f"{name}: part names must be unique, got {names}")
    return Plan(str(raw.get("name", name)), parts, str(cost["stream"]), _limit(f"{name}: cost", cost["limit"]), path)


def load_plan(path: str | os.PathLike[str]) -> Plan:
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"matrix plan {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    return parse_plan(raw, name=path.stem, path=path)


__all__ = ["Cell", "FULL", "Part", "Plan", "load_plan", "parse_plan"]
