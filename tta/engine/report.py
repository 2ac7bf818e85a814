"""Result tables: the text table printed by `tta bench`, results.json, results.csv and the PNG plot."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tta.engine.guard import STATE_ACTIONS
from tta.engine.metrics import RunResult
from tta.fileio import write_text_atomic


def domain_order(results: Mapping[str, RunResult]) -> list[str]:
    """Domains in stream order, over every adapter's result."""
    order: list[str] = []
    for r in results.values():
        for d in r.domains:
            if d in r.domain_errors and d not in order:
                order.append(d)
    return order


def results_dict(results: Mapping[str, RunResult]) -> dict[str, dict[str, Any]]:
    """``{adapter: {"domains": {name: error_pct}, "mean": pct, "images_per_s": x, ...}}``."""
    out: dict[str, dict[str, Any]] = {}
    for name, r in results.items():
        out[name] = {
            "domains": {d: round(e, 4) for d, e in r.domain_errors.items()},
            "mean": None if r.mean_error is None else round(r.mean_error, 4),
            "images_per_s": round(r.images_per_s, 2),
            "latency_ms_p50": round(r.latency_ms_p50, 3),
            "latency_ms_p95": round(r.latency_ms_p95, 3),
            "images": r.images,
            "steps": r.steps,
            "skipped_batches": r.skipped_batches,
            "resets": r.resets,
            "stream_error": None if r.stream_error is None else round(r.stream_error, 4),
            "nonfinite_outputs": r.nonfinite_outputs,
            "guard_actions": sum(e["action"] in STATE_ACTIONS for e in r.guard_events),
        }
        if r.realtime is not None:
            out[name]["realtime"] = dict(r.realtime)
    return out


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def format_table(results: Mapping[str, RunResult]) -> str:
    """Rows: adapters; columns: error % per domain, mean, images/s (+ adapted % and step cost in source
    forwards under the real-time protocol)."""
    domains = domain_order(results)
    header = ["adapter", *domains, "mean", "images/s"]
    rows = [
        [name, *(_fmt(r.domain_errors.get(d)) for d in domains), _fmt(r.mean_error), _fmt(r.images_per_s, 1)]
        for name, r in results.items()
    ]
    if any(r.realtime is not None for r in results.values()):  # the real-time protocol's columns
        header += ["adapted %", "cost"]
        for row, r in zip(rows, results.values()):
            rt = r.realtime or {}
            fraction = rt.get("adapted_fraction")
            row += [_fmt(None if fraction is None else 100.0 * fraction, 1), _fmt(rt.get("adapter_cost_source_forwards"))]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def write_json(results: Mapping[str, RunResult], path: str | os.PathLike[str]) -> Path:
    return write_text_atomic(path, json.dumps(results_dict(results), indent=2) + "\n")


def write_csv(results: Mapping[str, RunResult], path: str | os.PathLike[str]) -> Path:
    domains = domain_order(results)
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(["adapter", *domains, "mean", "images_per_s", "latency_ms_p50", "latency_ms_p95"])
    for name, r in results.items():
        writer.writerow([
            name,
            *(f"{r.domain_errors[d]:.4f}" if d in r.domain_errors else "" for d in domains),
            "" if r.mean_error is None else f"{r.mean_error:.4f}",
            f"{r.images_per_s:.2f}",
            f"{r.latency_ms_p50:.3f}",
            f"{r.latency_ms_p95:.3f}",
        ])
    return write_text_atomic(path, buffer.getvalue())


def write_plot(results: Mapping[str, RunResult], path: str | os.PathLike[str], title: str = "") -> Path | None:
    """Error % per domain (x, stream order), one line per adapter; None when no labels were seen."""
    domains = domain_order(results)
    if not domains:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(domains) + 3.0), 4.5))
    xs = range(len(domains))
    for name, r in results.items():
        ys = [r.domain_errors.get(d, math.nan) for d in domains]
        ax.plot(xs, ys, marker="o", linewidth=1.5, label=f"{name} (mean {_fmt(r.mean_error)})")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(domains, rotation=45, ha="right")
    ax.set_ylabel("error %")
    ax.set_xlabel("domain (stream order)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(results: Mapping[str, RunResult], out_dir: str | os.PathLike[str], title: str = "",
                  meta: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write results.json, results.csv, results.png (when labeled) and meta.json into `out_dir`
    (each file replaced atomically, so a benchmark rewriting them after every adapter never leaves
    half a file)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"json": write_json(results, out / "results.json"), "csv": write_csv(results, out / "results.csv")}
    plot = write_plot(results, out / "results.png", title)
    if plot is not None:
        written["png"] = plot
    if meta is not None:
        details = {name: r.to_dict() for name, r in results.items()}
        write_text_atomic(out / "meta.json", json.dumps({**meta, "runs": details}, indent=2, default=str) + "\n")
        written["meta"] = out / "meta.json"
    return written
