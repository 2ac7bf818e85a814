"""One cell of a matrix plan: an adapter over a stream, or its cost and memory; with its protocol record.

`run_cell(cell)` returns ``{"result": ..., "meta": ...}`` and writes nothing (the matrix runner writes
it, so a cell runs the same in this process, in a subprocess or in a Ray worker). The adapter is built
as `tta bench` builds it (card artefacts such as the AdaNPC memory and CoTTA's ``ap=card``, the
spec's dataset preset, a tuned preset's values, then the cell's own ``set`` values), on a fresh copy
of the card's model; the global generators are seeded with the cell's seed, which also orders the
stream. `meta` records every protocol choice: stream, setting, corruptions and severities, images
per domain, order, reset, batch size, seed, the card and its checkpoint checksum and normalisation,
the adapter's full config and where its values came from, package version and commit, torch, threads.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import platform
import sys
import time
from typing import Any

from tta.protocol.plan import FULL, Cell


def _spec(cell: Cell) -> Any:
    from tta.streams import load_spec

    spec = load_spec(cell.stream)
    if cell.limit == FULL:
        spec = dataclasses.replace(spec, n_per_domain=None)
    elif cell.limit is not None:
        spec = dataclasses.replace(spec, n_per_domain=int(cell.limit))
    return spec


def build_adapter(cell: Cell, card: Any, spec_preset: str | None) -> tuple[Any, dict[str, Any]]:
    """The cell's adapter on a fresh copy of the card's model, and the record of its configuration."""
    import tta.models as models
    from tta.adapters import adapt, get_adapter_class
    from tta.cli.run import card_defaults
    from tta.protocol.presets import resolve

    cls = get_adapter_class(cell.adapter)
    preset = cell.preset or spec_preset
    base, tuned_values, entry = resolve(preset, card, cls.name, required=True)
    overrides = cls.Config.parse_assignments(list(cell.overrides))
    values = card_defaults(cls.name, {**tuned_values, **overrides}, argparse.Namespace(model=card.name))
    adapter = adapt(models.load(card.name, device="cpu"), cls.name, preset=base, **values)
    record = {
        "name": cls.name,
        "preset": base,
        "tuned": None if entry is None else {"preset": entry.preset, "values": entry.values, "file": str(entry.path),
                                             "validation_stream": entry.validation.get("stream")},
        "overrides": {k: v for k, v in overrides.items()},
        "config": adapter.config.to_dict(),
    }
    return adapter, record


def card_record(card: Any) -> dict[str, Any]:
    return {
        "card": card.name, "arch": card.arch, "checkpoint_sha256": card.sha256,
        "input_size": list(card.input_size), "clean_accuracy": card.clean_accuracy,
        "normalization": {"inside_model": True, "mean": None if card.mean is None else list(card.mean),
                          "std": None if card.std is None else list(card.std)},
    }


def stream_record(spec: Any, stream: Any, seed: int) -> dict[str, Any]:
    return {
        "stream": spec.name, "role": spec.role, "dataset": spec.dataset, "data": spec.data, "setting": spec.setting,
        "corruptions": list(spec.corruptions), "severities": list(spec.severities),
        "images_per_domain": spec.n_per_domain, "images": int(sum(stream.domain_sizes.values())),
        "domains": len(stream.domains), "order": spec.order, "concentration": spec.concentration,
        "first_from_5": spec.first_from_5 if spec.setting == "gradual" else None, "reset": spec.reset,
        "batch_size": spec.batch_size, "seed": seed,
    }


def environment_record(threads: int) -> dict[str, Any]:
    import torch

    from tta.provenance import provenance

    return {
        **provenance(), "torch": torch.__version__, "threads": threads, "python": sys.version.split()[0],
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def run_cell(cell: Cell, data_dir: str | None = None, threads: int = 1) -> dict[str, Any]:
    """Run `cell`; ``{"result": ..., "meta": ...}`` (see the module docstring)."""
    import torch

    from tta.models import get_card

    torch.set_num_threads(threads)
    start, cpu_start = time.perf_counter(), time.process_time()
    card = get_card(cell.model)
    spec = _spec(cell)
    if card.num_classes != spec.num_classes:
        from tta.errors import ConfigError

        raise ConfigError(f"card {card.name} has {card.num_classes} classes, stream {spec.name} {spec.num_classes}")
    run = _run_cost if cell.kind == "cost" else _run_stream
    result, stream = run(cell, card, spec, data_dir)
    meta = {
        "cell": cell.to_dict(), "cell_digest": cell.digest(), "kind": cell.kind, "label": cell.label,
        "protocol": stream_record(spec, stream, cell.seed), "model": card_record(card),
        "adapter": result.pop("_adapter_record"), **environment_record(threads),
    }
    meta["seconds"] = round(time.perf_counter() - start, 2)  # wall time: inflated on a loaded machine
    meta["cpu_seconds"] = round(time.process_time() - cpu_start, 2)  # CPU time of this process (all its threads)
    return {"result": result, "meta": meta}


def _run_stream(cell: Cell, card: Any, spec: Any, data_dir: str | None) -> tuple[dict[str, Any], Any]:
    import torch

    from tta.engine import run_stream, seed_everything
    from tta.engine.report import results_dict

    stream = spec.build(seed=cell.seed, data_dir=data_dir)
    seed_everything(cell.seed)
    adapter, record = build_adapter(cell, card, spec.preset)
    result = run_stream(adapter, stream, progress=False, seed=cell.seed, log=lambda _: None, keep_predictions=True)
    out = results_dict({cell.label: result})[cell.label]
    # every prediction of the run, in order, as one digest: equal digests = the same run (sequential vs Ray)
    out["predictions_sha256"] = hashlib.sha256(result.predictions.to(torch.int64).numpy().tobytes()).hexdigest()
    out["counters"] = {k: int(v) for k, v in getattr(adapter, "counters", {}).items()}
    out["_adapter_record"] = record
    return out, stream


def _run_cost(cell: Cell, card: Any, spec: Any, data_dir: str | None) -> tuple[dict[str, Any], Any]:
    import tta.models as models
    from tta.engine import seed_everything
    from tta.protocol.cost import step_cost, step_memory

    stream = spec.build(seed=cell.seed, data_dir=data_dir)
    batches = [b.x for b in stream]
    seed_everything(cell.seed)
    adapter, record = build_adapter(cell, card, spec.preset)
    cost = step_cost(adapter, models.load(card.name, device="cpu"), batches)
    seed_everything(cell.seed)
    fresh, _ = build_adapter(cell, card, spec.preset)
    memory = step_memory(fresh, models.load(card.name, device="cpu"), batches[0])
    return {"cost": cost, "memory": memory, "_adapter_record": record}, stream


__all__ = ["build_adapter", "run_cell"]
