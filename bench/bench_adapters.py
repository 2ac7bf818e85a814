"""Per-batch cost of every registered adapter relative to the source model's forward pass.

Each adapter wraps its own fresh copy of the same model and runs predict-and-adapt on the same
batch; the source forward (eval mode, no grad) is timed on the same batch. Timings are taken side
by side: every round times each entry once, in turn, so machine-load drifts hit all entries alike;
the table reports medians and the ratio to the source forward's median.

Model: ``--model CARD``, by default the default card (`tta.models.DEFAULT_CARD`) when its checkpoint
is present, else a ResNet-20 (CIFAR, 0.27 M parameters) with untrained weights as a same-sized
stand-in (compute per batch does not depend on the weight values). Batch: 200 Fashion-MNIST test images at 32x32 RGB
with gaussian_noise severity 5 (adapters whose compute depends on confidence, e.g. CoTTA's
augmentation averaging, see shifted data as in a benchmark), or uniform noise when the dataset is
not installed.

    nice -n 10 .venv/bin/python bench/bench_adapters.py [--adapters all] [--batch-size 200] [--rounds 15]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import tta
from tta.adapters.base import infer_in_channels
from tta.errors import TTAError


def load_model(card: str | None) -> tuple[nn.Module, str]:
    import tta.models as models

    name = card or models.DEFAULT_CARD
    try:
        return models.load(name), f"card {name}"
    except TTAError as exc:
        if card is not None:
            raise
        print(f"note: default card unavailable ({exc}); using an untrained ResNet-20 stand-in", file=sys.stderr)
        return models.build_model("resnet20", num_classes=10).eval(), "resnet20 stand-in (untrained, 10 classes)"


def make_batch(batch_size: int, in_chans: int, size: int) -> tuple[torch.Tensor, str]:
    try:
        from tta.streams import corrupt, load_fashion_mnist

        images, _ = load_fashion_mnist("test")
        if in_chans == 3 and size == images.shape[1]:
            shifted = corrupt(images[:batch_size], "gaussian_noise", 5, seed=0)
            x = torch.from_numpy(shifted).permute(0, 3, 1, 2).float().div(255)
            return x.contiguous(), f"{batch_size} Fashion-MNIST test images, gaussian_noise@5"
    except TTAError as exc:
        print(f"note: Fashion-MNIST unavailable ({exc}); timing on uniform noise", file=sys.stderr)
    g = torch.Generator().manual_seed(0)
    return torch.rand(batch_size, in_chans, size, size, generator=g), f"{batch_size} uniform-noise images"


def prepare_fisher(adapter: nn.Module, model: nn.Module, card: str) -> None:
    """EATA gets the card's Fisher file (`tta build-fisher`), else (no file, or the stand-in model) one
    computed on 2,000 Fashion-MNIST train images (uniform noise without the dataset)."""
    if not hasattr(adapter, "set_fisher") or getattr(adapter, "_fisher_sqrt", None) is not None:
        return
    from tta.adapters.eata import compute_fisher, fisher_path_for_card, load_fisher

    try:
        adapter.set_fisher(load_fisher(fisher_path_for_card(card))[0])
        return
    except TTAError:
        pass
    try:
        from tta.streams import load_fashion_mnist

        images = torch.from_numpy(load_fashion_mnist("train")[0][:2000]).permute(0, 3, 1, 2)
    except TTAError:
        images = torch.rand(2000, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    adapter.set_fisher(compute_fisher(model, images, batch_size=200))


def prepare_prototypes(adapter: nn.Module, model: nn.Module, card: str) -> None:
    """RMT gets the card's prototypes file (`tta build-prototypes`), else (no file, or the stand-in model)
    class means of features of 2,000 Fashion-MNIST train images (uniform noise without the dataset)."""
    if not hasattr(adapter, "set_prototypes") or getattr(adapter, "_prototypes", None) is not None:
        return
    from tta.adapters.rmt import compute_prototypes, load_prototypes, resolve_prototypes_path

    try:
        adapter.set_prototypes(load_prototypes(resolve_prototypes_path(card))[0])
        return
    except TTAError:
        pass
    try:
        from tta.streams import load_fashion_mnist

        images, labels = load_fashion_mnist("train")
        images, labels = torch.from_numpy(images[:2000]).permute(0, 3, 1, 2), torch.from_numpy(labels[:2000])
    except TTAError:
        g = torch.Generator().manual_seed(1)
        images, labels = torch.rand(2000, 3, 32, 32, generator=g), torch.arange(2000) % adapter.num_classes
    adapter.set_prototypes(compute_prototypes(model, images, labels, adapter.num_classes))


def prepare(adapter: nn.Module, model: nn.Module, memory_images: int) -> None:
    """Adapters that need a source memory (AdaNPC) get one built from Fashion-MNIST train images."""
    if not hasattr(adapter, "set_source_memory") or getattr(adapter, "memory", None) is not None:
        return
    from tta.adapters.adanpc import build_source_memory

    try:
        from tta.streams import load_fashion_mnist

        images, labels = load_fashion_mnist("train")
        images = torch.from_numpy(images[:memory_images]).permute(0, 3, 1, 2)
        labels = torch.from_numpy(labels[:memory_images]).long()
    except TTAError:
        g = torch.Generator().manual_seed(1)
        images = torch.rand(memory_images, 3, 32, 32, generator=g)
        labels = torch.randint(0, 10, (memory_images,), generator=g)
    with torch.no_grad():
        num_classes = int(model(images[:1].float() / (255.0 if images.dtype == torch.uint8 else 1.0)).shape[1])
    features, labels = build_source_memory(copy.deepcopy(model), images, labels)
    adapter.set_source_memory(features, labels, num_classes)


def timed(fn, x: torch.Tensor, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    else:
        out.sum().item()  # materialise
    return (time.perf_counter() - t0) * 1e3


def engine_overhead(model: nn.Module, x: torch.Tensor, device: torch.device, rounds: int) -> None:
    """`run_stream` (prefetch thread, metrics) vs a bare predict-and-adapt loop on the same batches."""
    from tta.engine import run_stream
    from tta.streams.base import TensorStream

    batches = 8
    xs = x.cpu().repeat(batches, 1, 1, 1)
    stream = TensorStream([("d", xs, torch.zeros(xs.shape[0], dtype=torch.int64))], x.shape[0])
    bare_adapter = tta.adapt(copy.deepcopy(model), "bn").to(device)
    engine_adapter = tta.adapt(copy.deepcopy(model), "bn")

    def bare() -> float:
        t0 = time.perf_counter()
        for b in stream:
            bare_adapter(b.x.to(device)).argmax(1).cpu()
        return time.perf_counter() - t0

    def engine() -> float:
        return run_stream(engine_adapter, stream, device=device, progress=False, log=lambda _: None).seconds

    bare(), engine()  # warm-up
    t_bare, t_engine = [], []
    for _ in range(rounds):
        t_bare.append(bare())
        t_engine.append(engine())
    b, e = statistics.median(t_bare), statistics.median(t_engine)
    n = xs.shape[0]
    print(f"engine overhead (bn, {batches} batches of {x.shape[0]}): bare loop {n / b:.1f} img/s, "
          f"run_stream {n / e:.1f} img/s, ratio {e / b:.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model card (default: the default card, else a ResNet-20 stand-in)")
    parser.add_argument("--adapters", default="all", help="comma-separated names or 'all'")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--rounds", type=int, default=15, help="timed steps per entry")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per entry first")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--memory-images", type=int, default=10000,
                        help="source memory rows for memory-based adapters (AdaNPC)")
    parser.add_argument("--engine-overhead", action="store_true",
                        help="also time run_stream against a bare loop (bn adapter)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model, model_desc = load_model(args.model)
    in_chans = infer_in_channels(model) or 3
    x, batch_desc = make_batch(args.batch_size, in_chans, args.size)
    x = x.to(device)
    names = tta.list_adapters() if args.adapters == "all" else [n.strip() for n in args.adapters.split(",") if n.strip()]

    source = copy.deepcopy(model).to(device).eval()

    @torch.no_grad()
    def source_forward(batch: torch.Tensor) -> torch.Tensor:
        return source(batch)

    entries: dict[str, object] = {"source forward": source_forward}
    skipped: dict[str, str] = {}
    for name in names:
        try:
            adapter = tta.adapt(copy.deepcopy(model), name)
            prepare(adapter, model, args.memory_images)
            prepare_fisher(adapter, model, args.model or tta.models.DEFAULT_CARD)
            prepare_prototypes(adapter, model, args.model or tta.models.DEFAULT_CARD)
            entries[name] = adapter.to(device)
        except TTAError as exc:
            skipped[name] = str(exc)

    for fn in entries.values():
        for _ in range(args.warmup):
            timed(fn, x, device)
    times: dict[str, list[float]] = {name: [] for name in entries}
    for _ in range(args.rounds):
        for name, fn in entries.items():
            times[name].append(timed(fn, x, device))

    base = statistics.median(times["source forward"])
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, {device}"
    print(f"model: {model_desc}; batch: {batch_desc}; {args.rounds} rounds after {args.warmup} warm-up; {machine}")
    print(f"{'adapter':<16} {'ms/batch p50':>13} {'p90':>9} {'x source fwd':>13}")
    rows = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        p90 = sorted(ts)[min(len(ts) - 1, int(0.9 * len(ts)))]
        rows[name] = {"ms_p50": round(med, 3), "ms_p90": round(p90, 3), "ratio": round(med / base, 3)}
        print(f"{name:<16} {med:>13.2f} {p90:>9.2f} {med / base:>13.2f}")
    for name, why in skipped.items():
        print(f"{name:<16} {'n/a':>13}  ({why})")
    if args.engine_overhead:
        engine_overhead(model, x, device, max(3, args.rounds // 3))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": model_desc, "batch": batch_desc, "machine": machine, "rounds": args.rounds,
            "torch": torch.__version__, "results": rows, "skipped": skipped,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
