"""CoTTA per-batch time: fast path vs its compute floor vs reference_mode, measured in one run.

The compute floor is what any exact CoTTA must do on a batch that uses augmentation: (N + 3)
forwards (student, anchor, teacher, N augmented teacher views) and 1 backward of the same model at
the same batch size, with CoTTA's model configuration (BatchNorm on batch statistics). Augmentation,
EMA, restore and optimizer are outside the floor.

Modes are interleaved batch by batch so machine-load drift hits them alike. ``--ap 1.0`` forces
augmentation on every batch (the worst case the floor describes); ``--skip`` adds the fast path
with augmentation skipped (a confident anchor).

    .venv/bin/python bench/bench_cotta.py --model resnet20 --batch 200 --size 32 --batches 2
    .venv/bin/python bench/bench_cotta.py --model timm:resnet50 --batch 64 --size 224 --batches 1 \
        --views-per-forward 2 --classes 1000
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch
from torch import nn

import tta
from tta.layers import replace_batchnorms


def build(model: str, classes: int) -> tuple[nn.Module, str]:
    try:
        from tta.models import get_card, list_cards, load

        if model in list_cards():
            card = get_card(model)
            return load(card), f"card {card.name}"
    except Exception:  # no models package or card: fall back to an architecture with random weights
        pass
    from tta.models.builders import build_model

    return build_model(model, num_classes=classes).eval(), f"{model} (random weights)"


def floor_step(model: nn.Module, x: torch.Tensor, n_views: int) -> None:
    """(n_views + 2) no-grad forwards + 1 forward with grad + 1 backward, each at batch size B."""
    with torch.no_grad():
        for _ in range(n_views + 2):
            model(x)
    model(x).logsumexp(1).mean().backward()
    model.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20-fmnist", help="card name, or an architecture (random weights)")
    ap.add_argument("--fallback", default="resnet20", help="architecture when the card is missing")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--views", type=int, default=32)
    ap.add_argument("--views-per-forward", type=int, default=0)
    ap.add_argument("--batches", type=int, default=2, help="timed batches per mode (after one warm-up)")
    ap.add_argument("--ap", type=float, default=1.0)
    ap.add_argument("--modes", default="floor,fast,reference,skip")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--out", default=None, help="write the JSON result here")
    args = ap.parse_args()

    torch.manual_seed(0)
    try:
        base, described = build(args.model, args.classes)
    except Exception:
        base, described = build(args.fallback, args.classes)
    x_all = torch.rand(args.batches + 1, args.batch, 3, args.size, args.size)
    modes = args.modes.split(",")
    runners = {}
    common = {"seed": 0, "n_views": args.views, "ap": args.ap, "views_per_forward": args.views_per_forward}
    if "floor" in modes:
        floor_model = copy.deepcopy(base)
        replace_batchnorms(floor_model, 0.0)
        floor_model.requires_grad_(True)
        runners["floor"] = lambda x: floor_step(floor_model, x, args.views)
    if "fast" in modes:
        runners["fast"] = tta.adapt(copy.deepcopy(base), "cotta", **common)
    if "reference" in modes:
        runners["reference"] = tta.adapt(copy.deepcopy(base), "cotta", reference_mode=True, **common)
    if "skip" in modes:
        runners["skip"] = tta.adapt(copy.deepcopy(base), "cotta", **{**common, "ap": 0.0})

    times: dict[str, list[float]] = {m: [] for m in runners}
    start = 0 if args.no_warmup else 1
    for i in range(start, args.batches + 1):
        for name, fn in runners.items():
            t = time.perf_counter()
            fn(x_all[i if i else 0])
            elapsed = time.perf_counter() - t
            if i >= 1 or args.no_warmup:
                times[name].append(elapsed)
            print(f"batch {i} {name}: {elapsed:.2f} s", flush=True)
    med = {m: statistics.median(v) for m, v in times.items() if v}
    result = {
        "model": described, "batch": args.batch, "size": args.size, "views": args.views,
        "views_per_forward": args.views_per_forward or "auto", "ap": args.ap, "timed_batches": args.batches,
        "seconds_per_batch": med,
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    if "floor" in med:
        result["ratio_to_floor"] = {m: med[m] / med["floor"] for m in med if m != "floor"}
    if "fast" in med and "reference" in med:
        result["reference_over_fast"] = med["reference"] / med["fast"]
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
