"""Hyperparameter tuning on validation streams only.

A grid (``key=v1,v2,...`` per key, typed by the adapter's config) is run point by point on a stream
whose spec declares ``role: validation`` (held-out corruptions; `tta.streams.specs`); any other stream
is refused before anything runs. Each point is a matrix cell (`tta.protocol.cell`), so a tuning run is
resumable and records the full protocol of every point. The point with the lowest mean validation
error is chosen (the earlier point on a tie) and written, with every point's error, into a tuned
preset (`tta.protocol.presets`); the test streams are then run with ``--preset tuned`` beside the
paper defaults.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tta.errors import ConfigError
from tta.protocol.plan import Cell


def parse_grid(items: list[str], config_cls: Any) -> dict[str, list[Any]]:
    """``["lr=1e-4,1e-3", "ap=0.6,0.9"]`` -> ``{"lr": [1e-4, 1e-3], "ap": [0.6, 0.9]}`` (typed and validated
    by `config_cls`; keys in the given order, values deduplicated)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid expects key=v1,v2,..., got {item!r}")
        key, raw = (part.strip() for part in item.split("=", 1))
        key = key.replace("-", "_")
        if key in grid:
            raise ConfigError(f"--grid: key {key!r} given twice")
        values = [v.strip() for v in raw.split(",") if v.strip()]
        if not values:
            raise ConfigError(f"--grid {item!r}: no values")
        typed = [config_cls.parse_assignments([f"{key}={v}"])[key] for v in values]
        grid[key] = list(dict.fromkeys(typed))
    if not grid:
        raise ConfigError("tta tune needs at least one --grid key=v1,v2,...")
    return grid


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The cartesian product, first key varying slowest."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def _text(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def point_cell(card: str, adapter: str, stream: str, seed: int, limit: int | str | None, preset: str | None,
               fixed: list[str], point: dict[str, Any]) -> Cell:
    assignments = [f"{k}={v}" for k, v in point.items()]
    return Cell("stream", card, adapter, stream, seed, limit, variant=",".join(assignments), preset=preset,
                overrides=tuple(fixed) + tuple(assignments))


def check_validation_stream(spec: Any) -> None:
    """Refuse to tune on anything but a validation stream."""
    if getattr(spec, "role", "test") != "validation":
        raise ConfigError(f"stream {spec.name} is a test stream (role: {getattr(spec, 'role', 'test')}); tta tune chooses "
                          "hyperparameters on validation streams only (role: validation, held-out corruptions), "
                          "e.g. --stream fmnist-c-val")


def tune(*, card: Any, adapter: str, spec: Any, grid: dict[str, list[Any]], fixed: list[str], seed: int,
         limit: int | str | None, preset: str | None, out: Path, data_dir: str | None = None, use_ray: bool = False,
         log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every grid point on the validation stream `spec`; returns the record `save` writes:
    ``{"points": [...], "chosen": {...}, ...}`` (points in grid order, each with its mean error)."""
    from tta.protocol.matrix import load_cell, run_matrix

    check_validation_stream(spec)
    points = grid_points(grid)
    cells = [point_cell(card.name, adapter, spec.name, seed, limit, preset, fixed, p) for p in points]
    run_matrix(cells, out, data_dir=data_dir, use_ray=use_ray, log=log)
    rows = []
    for point, cell in zip(points, cells):
        stored = load_cell(out, cell)
        if stored is None:
            raise ConfigError(f"grid point {cell.variant} did not finish (see {out / cell.key / 'error.txt'})")
        r = stored["result"]
        rows.append({"values": point, "mean_error": r["mean"], "domains": r["domains"],
                     "images_per_s": r["images_per_s"], "steps": r["steps"]})
    best = min(range(len(rows)), key=lambda i: (rows[i]["mean_error"], i))
    protocol = load_cell(out, cells[best])["meta"]["protocol"]  # type: ignore[index]
    return {
        "stream": spec.name, "role": spec.role, "corruptions": list(spec.corruptions),
        "images_per_domain": protocol["images_per_domain"], "images": protocol["images"], "seed": seed,
        "fixed": list(fixed), "grid": {k: v for k, v in grid.items()}, "points": rows, "chosen": rows[best],
    }


def format_points(record: dict[str, Any]) -> str:
    """The grid as a text table: one line per point, the chosen one marked."""
    keys = list(record["grid"])
    domains = list(record["points"][0]["domains"])
    header = [*keys, *domains, "mean", "img/s", ""]
    rows = []
    for p in record["points"]:
        mark = "<- chosen" if p is record["chosen"] or p == record["chosen"] else ""
        rows.append([*(_text(p["values"][k]) for k in keys), *(f"{p['domains'][d]:.2f}" for d in domains),
                     f"{p['mean_error']:.2f}", f"{p['images_per_s']:.1f}", mark])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(str(c).rjust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


__all__ = ["check_validation_stream", "format_points", "grid_points", "parse_grid", "point_cell", "tune"]
