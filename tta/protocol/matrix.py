"""Run the cells of a matrix plan, sequentially or on Ray, resumably.

Every cell writes ``<out>/<cell key>/meta.json`` (the protocol record, `tta.protocol.cell`) and then
``result.json``; a cell whose ``result.json`` exists and whose ``meta.json`` has the same cell digest and
the card's current checkpoint checksum is done and is skipped (a changed plan entry or a retrained card
reruns its cells; a change of code alone does not: each cell records its commit), so an interrupted run continues where it stopped and a finished plan costs nothing
to rerun. A cell being run holds ``<cell>/running.lock`` (its process id), so several runners on one
output folder (two shells on two cores, or a runner restarted while another still works) never run the
same cell twice; a lock whose process is gone is taken over. A failing cell writes ``error.txt`` and the
others go on; it is retried by the next run.

With Ray (``use_ray``), every pending cell is one Ray task (one CPU, one torch thread), on a local Ray
instance started for the run or on an existing cluster (``address``); the tasks return their results
and this process writes them, so workers need the data and cards, not the output folder. A cell
computes the same thing in a task as in the sequential loop (same code, seeds, one thread).
"""

from __future__ import annotations

import functools
import json
import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tta.fileio import write_text_atomic
from tta.protocol.plan import Cell

#: environment variables a Ray worker needs to find the same code, cards, specs, presets and data
FORWARDED_ENV = ("PYTHONPATH", "TTA_DATA_DIR", "TTA_MODELS_DIR", "TTA_STREAMS_DIR", "TTA_PRESETS_DIR",
                 "TTA_FASHION_MNIST_DIR", "TTA_DISABLE_C")


def cell_dir(out: Path, cell: Cell) -> Path:
    return out / cell.key


@functools.lru_cache(maxsize=None)
def _checkpoint_sha256(card: str) -> str | None:
    from tta.models import get_card

    try:
        return get_card(card).sha256
    except Exception:  # noqa: BLE001 - an unknown card: its cells will fail when run, with the reason
        return None


def load_cell(out: Path, cell: Cell) -> dict[str, Any] | None:
    """The stored ``{"result", "meta"}`` of `cell`, or None when it is not done, was another definition,
    or ran on another checkpoint of its card (a retrained card reruns its cells)."""
    folder = cell_dir(out, cell)
    try:
        meta = json.loads((folder / "meta.json").read_text())
        result = json.loads((folder / "result.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("cell_digest") != cell.digest():
        return None
    stored, current = (meta.get("model") or {}).get("checkpoint_sha256"), _checkpoint_sha256(cell.model)
    if stored and current and stored != current:
        return None
    return {"result": result, "meta": meta}


def write_cell(out: Path, cell: Cell, payload: dict[str, Any]) -> Path:
    folder = cell_dir(out, cell)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "error.txt").unlink(missing_ok=True)
    write_text_atomic(folder / "meta.json", json.dumps(payload["meta"], indent=2) + "\n")
    return write_text_atomic(folder / "result.json", json.dumps(payload["result"], indent=2) + "\n")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _take_lock(folder: Path) -> bool:
    """Claim a cell for this process (False: another live runner holds it)."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / "running.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                holder = 0
            if holder and holder != os.getpid() and _pid_alive(holder):
                return False
            lock.unlink(missing_ok=True)  # stale: its runner is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def _release_lock(folder: Path) -> None:
    (folder / "running.lock").unlink(missing_ok=True)


def _record_failure(out: Path, cell: Cell, text: str) -> None:
    folder = cell_dir(out, cell)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "error.txt", text)


def _cell_task(cell: dict[str, Any], data_dir: str | None) -> dict[str, Any]:
    from tta.protocol.cell import run_cell

    return run_cell(Cell.from_dict(cell), data_dir=data_dir, threads=1)


def run_matrix(cells: list[Cell], out: str | os.PathLike[str], *, data_dir: str | None = None, use_ray: bool = False,
               address: str | None = None, workers: int | None = None,
               log: Callable[[str], None] = print) -> dict[str, int]:
    """Run every pending cell; returns counts ``{"cells", "done_before", "ran", "failed", "busy"}``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pending = [c for c in cells if load_cell(out, c) is None]
    counts = {"cells": len(cells), "done_before": len(cells) - len(pending), "ran": 0, "failed": 0, "busy": 0}
    log(f"{len(cells)} cells: {counts['done_before']} done before, {len(pending)} to run"
        + (" on Ray" if use_ray and pending else ""))
    if pending:
        (_run_on_ray if use_ray else _run_sequential)(pending, out, data_dir, counts, log, address, workers)
    log(f"ran {counts['ran']}, failed {counts['failed']}, held by another runner {counts['busy']}")
    return counts


def _run_sequential(pending: list[Cell], out: Path, data_dir: str | None, counts: dict[str, int],
                    log: Callable[[str], None], address: str | None, workers: int | None) -> None:
    from tta.protocol.cell import run_cell

    for i, cell in enumerate(pending, 1):
        folder = cell_dir(out, cell)
        if load_cell(out, cell) is not None or not _take_lock(folder):  # another runner did or does it
            counts["busy"] += 1
            continue
        try:
            payload = run_cell(cell, data_dir=data_dir, threads=1)
        except Exception as exc:  # noqa: BLE001 - one failing cell must not cost the others
            counts["failed"] += 1
            _record_failure(out, cell, traceback.format_exc())
            log(f"[{i}/{len(pending)}] {cell.key}: FAILED {type(exc).__name__}: {exc}")
            continue
        finally:
            _release_lock(folder)
        write_cell(out, cell, payload)
        counts["ran"] += 1
        log(f"[{i}/{len(pending)}] {cell.key}: {summary(payload)}")


def _run_on_ray(pending: list[Cell], out: Path, data_dir: str | None, counts: dict[str, int],
                log: Callable[[str], None], address: str | None, workers: int | None) -> None:
    try:
        import ray
    except ImportError as exc:
        from tta.errors import MissingDependencyError

        raise MissingDependencyError("--ray needs Ray: pip install ray (the tta-runtime[serve] extra installs it)") from exc
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}, "log_to_driver": False}
        if address is None:
            kwargs.update(num_cpus=workers or os.cpu_count() or 1, include_dashboard=False)
        ray.init(address=address, **kwargs)
        started = True
    try:
        task = ray.remote(num_cpus=1, max_retries=0)(_cell_task)
        refs = {task.remote(c.to_dict(), data_dir): c for c in pending}
        log(f"Ray: {len(refs)} tasks on {ray.cluster_resources().get('CPU', 0):.0f} CPUs")
        done_n = 0
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            for ref in ready:
                cell = refs.pop(ref)
                done_n += 1
                try:
                    payload = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - a task's failure is that cell's
                    counts["failed"] += 1
                    _record_failure(out, cell, f"{type(exc).__name__}: {exc}\n")
                    log(f"[{done_n}/{len(pending)}] {cell.key}: FAILED {type(exc).__name__}")
                    continue
                write_cell(out, cell, payload)
                counts["ran"] += 1
                log(f"[{done_n}/{len(pending)}] {cell.key}: {summary(payload)}")
    finally:
        if started:
            ray.shutdown()


def compare(cells: list[Cell], out: Path, other: Path) -> tuple[int, list[str]]:
    """Cells stored in both folders and how their results differ (per-domain errors, steps, the digest
    of every prediction; cost cells are timings and are not compared)."""
    compared, differences = 0, []
    for cell in cells:
        if cell.kind != "stream":
            continue
        a, b = load_cell(out, cell), load_cell(other, cell)
        if a is None or b is None:
            continue
        compared += 1
        for key in ("domains", "mean", "steps", "predictions_sha256"):
            if a["result"].get(key) != b["result"].get(key):
                differences.append(f"{cell.key}: {key} {a['result'].get(key)} != {b['result'].get(key)}")
    return compared, differences


def summary(payload: dict[str, Any]) -> str:
    """One line about a finished cell."""
    r, seconds = payload["result"], payload["meta"].get("seconds")
    if "cost" in r:
        return (f"cost {r['cost']['ratio']:.2f}x source, memory {r['memory']['ratio']:.2f}x source "
                f"({seconds} s)")
    return f"mean error {r['mean']:.2f}% ({r['images']} images, {r['images_per_s']:.0f} img/s, {seconds} s)"


__all__ = ["cell_dir", "compare", "load_cell", "run_matrix", "write_cell"]
