"""The results table of a matrix plan: mean +- std over seeds per adapter x setting, cost and memory.

One Markdown table per card. Rows: adapters (a part's variant is a row of its own, e.g. "cotta
(tuned)"); columns: the plan's streams (a "full" size gets a column of its own), then the step cost
relative to the source forward and the memory of a step relative to source inference (`tta.protocol.cost`).
A cell shows the mean error over seeds +- the sample standard deviation; fewer seeds than the column's
most, or fewer images per domain than the column's, are written next to the figure. Above each table,
the protocol of every column (from the cells' meta.json: setting, corruptions, severities, images per
domain, order, reset, batch size, seeds), the card (checkpoint SHA-256, normalisation, clean accuracy)
and the code (package version, commits, torch, threads), so two tables can be compared without
reading code.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from tta.protocol.matrix import load_cell
from tta.protocol.plan import FULL, Cell, Plan


def _column(cell: Cell) -> str:
    short = cell.stream.split("-c-", 1)[-1] if "-c-" in cell.stream else cell.stream
    return f"{short} (full)" if cell.limit == FULL else short


def collect(plan: Plan, out: Path) -> dict[str, Any]:
    """Stored results of the plan's cells, grouped: ``{card: {"rows", "columns", "values", "cost", "meta"}}``."""
    cards: dict[str, Any] = {}
    missing = 0
    for cell in plan.cells():
        stored = load_cell(out, cell)
        card = cards.setdefault(cell.model, {"rows": [], "columns": [], "runs": defaultdict(list), "cost": {},
                                             "metas": defaultdict(list), "missing": 0})
        if cell.label not in card["rows"]:
            card["rows"].append(cell.label)
        if stored is None:
            card["missing"] += 1
            missing += 1
            continue
        if cell.kind == "cost":
            card["cost"][cell.label] = stored
            continue
        column = _column(cell)
        if column not in card["columns"]:
            card["columns"].append(column)
        card["runs"][(cell.label, column)].append(stored)
        card["metas"][column].append(stored["meta"])
    return cards


def _stats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    means = [r["result"]["mean"] for r in runs if r["result"].get("mean") is not None]
    sizes = sorted({r["meta"]["protocol"]["images_per_domain"] or 0 for r in runs})
    return {
        "mean": statistics.fmean(means) if means else None,
        "std": statistics.stdev(means) if len(means) > 1 else None,
        "seeds": sorted(r["meta"]["protocol"]["seed"] for r in runs),
        "images_per_domain": sizes,
    }


def _fmt_size(n: int) -> str:
    return "all" if not n else f"{n:,}"


def protocol_lines(card_name: str, card: dict[str, Any]) -> list[str]:
    """The header: what every column ran, on which card, with which code."""
    lines: list[str] = []
    any_meta = next((m for ms in card["metas"].values() for m in ms), None)
    if any_meta is None:
        return [f"(no results yet for {card_name})"]
    model = any_meta["model"]
    norm = model["normalization"]
    lines.append(f"- card `{model['card']}` ({model['arch']}), checkpoint sha256 `{(model['checkpoint_sha256'] or '')[:16]}`, "
                 f"clean accuracy {model['clean_accuracy']}%, inputs in [0, 1] normalised inside the model "
                 f"(mean {norm['mean']}, std {norm['std']})")
    for column, metas in card["metas"].items():
        p = metas[0]["protocol"]
        sizes = sorted({m["protocol"]["images_per_domain"] or 0 for m in metas})
        seeds = sorted({m["protocol"]["seed"] for m in metas})
        order = p["order"] + (f" (concentration {p['concentration']})" if p["order"] == "dirichlet" else "")
        sev = "1-5-1 per corruption" if p["setting"] == "gradual" else ",".join(map(str, p["severities"]))
        lines.append(f"- **{column}**: `{p['stream']}`, {p['setting']}, {len(p['corruptions'])} corruptions "
                     f"({p['corruptions'][0]} ... {p['corruptions'][-1]}), severity {sev}, "
                     f"{'/'.join(_fmt_size(s) for s in sizes)} images per domain, order {order}, reset {p['reset']}, "
                     f"batch {p['batch_size']}, seeds {','.join(map(str, seeds))}")
    metas = [m for ms in card["metas"].values() for m in ms] + [c["meta"] for c in card["cost"].values()]
    versions = sorted({m.get("version", "?") for m in metas})
    commits = sorted({((m.get("git") or {}).get("commit") or "?")[:10] + ("+changes" if (m.get("git") or {}).get("dirty")
                                                                           else "") for m in metas})
    torches = sorted({m.get("torch", "?") for m in metas})
    threads = sorted({m.get("threads", "?") for m in metas})
    lines.append(f"- code: tta-runtime {', '.join(versions)}, commits {', '.join(commits)}; "
                 f"torch {', '.join(torches)}, {', '.join(map(str, threads))} torch thread(s) per run")
    if card["cost"]:
        c = next(iter(card["cost"].values()))["meta"]["protocol"]
        lines.append(f"- cost and memory: `{c['stream']}` at {_fmt_size(c['images_per_domain'])} images per domain "
                     f"(batch {c['batch_size']}), step and source forward timed in pairs on the same batches; memory = "
                     "(adapter's resident tensors + peak of one step) / (source model + peak of one forward), "
                     "allocator bytes from the torch profiler")
    return lines


def render(plan: Plan, out: Path) -> str:
    """The Markdown tables of every card in the plan."""
    blocks = []
    for card_name, card in collect(plan, out).items():
        columns = card["columns"]
        stats = {key: _stats(runs) for key, runs in card["runs"].items()}
        most_seeds = {col: max((len(s["seeds"]) for (r, c), s in stats.items() if c == col), default=0) for col in columns}
        most_images = {col: max((max(s["images_per_domain"]) for (r, c), s in stats.items() if c == col), default=0)
                       for col in columns}
        best = {col: min((s["mean"] for (r, c), s in stats.items() if c == col and s["mean"] is not None),
                         default=None) for col in columns}
        header = ["adapter", *columns, "cost (x source fwd)", "memory (x source)"]
        lines = [f"### {card_name}", "", *protocol_lines(card_name, card), "",
                 "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in card["rows"]:
            cells = [row]
            for col in columns:
                s = stats.get((row, col))
                if s is None or s["mean"] is None:
                    cells.append("")
                    continue
                text = f"{s['mean']:.2f}" + (f" ± {s['std']:.2f}" if s["std"] is not None else "")
                if best[col] is not None and math.isclose(s["mean"], best[col]):
                    text = f"**{text}**"
                notes = []
                if len(s["seeds"]) < most_seeds[col]:
                    notes.append(f"{len(s['seeds'])} seed" + ("s" if len(s["seeds"]) > 1 else ""))
                if s["images_per_domain"] and 0 < max(s["images_per_domain"]) < most_images[col]:
                    notes.append(f"{max(s['images_per_domain']):,}/domain")
                cells.append(text + (f" ({', '.join(notes)})" if notes else ""))
            cost = card["cost"].get(row)
            if cost is None:
                cells += ["", ""]
            else:
                r = cost["result"]
                cells += [f"{r['cost']['ratio']:.2f}", f"{r['memory']['ratio']:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
        if card["missing"]:
            lines.append("")
            lines.append(f"({card['missing']} cell(s) of this card not run yet)")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


__all__ = ["collect", "protocol_lines", "render"]
