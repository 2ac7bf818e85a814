"""Edge runtime vs PyTorch runtime on a continual stream: prediction agreement and throughput.

For every batch of the stream (default: the default Fashion-MNIST-C continual spec and the default
model card) this runs, side by side in one process with the same thread count:
- source: PyTorch model vs the ``frozen`` export on onnxruntime (EdgeSource);
- alpha-BN: `tta.adapt(model, "alpha-bn")` vs the ``alpha-bn`` export (EdgeAlphaBN);
- AdaNPC: `tta.adapt(model, "adanpc")` vs the ``features`` export + numpy memory (EdgeAdaNPC),
  both starting from the same source memory;
and reports per-method error, the argmax agreement between the two runtimes, and images/s.

    nice -n 10 .venv/bin/python bench/bench_edge.py --threads 1 --out bench/results/edge.json
    python bench/bench_edge.py --device cuda --providers cuda --stream fmnist-c-recurring \
        --n-per-domain 200        # GPU: PyTorch on CUDA vs onnxruntime's CUDA execution provider

Throughput counts the adapter call only (not stream decoding); each runtime runs the same batches.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import tta
from tta.edge import EdgeAdaNPC, EdgeAlphaBN, EdgeModel, EdgeSource
from tta.export import export_onnx


def standin_model(n_calibration: int = 4000) -> torch.nn.Module:
    """Stand-in when the model card is not there yet: ResNet-20 (random conv weights) whose BN
    statistics are recalibrated on Fashion-MNIST train images, inside `Normalized`. Not a trained model."""
    from tta.models import build_model
    from tta.models.normalize import Normalized
    from tta.streams.fashion_mnist import load_fashion_mnist

    torch.manual_seed(0)
    model = Normalized(build_model("resnet20", num_classes=10), [0.286] * 3, [0.353] * 3)
    images, _ = load_fashion_mnist("train")
    x = torch.from_numpy(images[:n_calibration]).permute(0, 3, 1, 2).float() / 255
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
    with torch.no_grad():
        for i in range(0, n_calibration, 200):
            model(x[i:i + 200])
    return model.eval()


def source_memory(model: torch.nn.Module, card: str | None, n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    from tta.adapters.adanpc import build_source_memory, load_memory, memory_path_for_card

    if card is not None:
        try:
            path = memory_path_for_card(card)
            if path.is_file():
                feats, labels, _, _ = load_memory(path)
                return feats, labels, f"{path.name} ({feats.shape[0]} rows)"
        except Exception:  # noqa: BLE001 - fall back to building one
            pass
    from tta.streams.fashion_mnist import load_fashion_mnist

    images, labels = load_fashion_mnist("train")
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(images.shape[0], n, replace=False))
    x = torch.from_numpy(images[idx]).permute(0, 3, 1, 2).contiguous()
    feats, y = build_source_memory(model, x, torch.from_numpy(labels[idx]))
    return feats, y, f"{n} Fashion-MNIST train images (seed 0)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model card (default: the default card)")
    parser.add_argument("--standin", action="store_true", help="use the BN-calibrated random ResNet-20 stand-in")
    parser.add_argument("--stream", default=None, help="stream spec (default: the default spec)")
    parser.add_argument("--n-per-domain", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--source-weight", type=float, default=0.9)
    parser.add_argument("--memory-size", type=int, default=10000, help="source rows when no card memory file exists")
    parser.add_argument("--capacity", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--export-dir", default=None)
    parser.add_argument("--device", default="cpu", help="device of the PyTorch side (cpu, cuda)")
    parser.add_argument("--providers", default="cpu",
                        help="onnxruntime execution providers of the edge side: cpu, cuda, tensorrt or auto")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    from tta.models import DEFAULT_CARD, list_cards, load
    from tta.streams import DEFAULT_SPEC, load_spec

    card = None if args.standin else (args.model or DEFAULT_CARD)
    if card is not None and card not in list_cards() and not card.endswith((".yaml", ".yml")):
        print(f"model card {card} not found; use --standin", file=sys.stderr)
        return 2
    model = standin_model() if card is None else load(card)
    out_dir = Path(args.export_dir or tempfile.mkdtemp(prefix="tta_edge_bench_"))
    target = model if card is None else card
    t0 = time.perf_counter()
    reports = {
        "frozen": export_onnx(target, out_dir / "frozen.onnx", mode="frozen", input_size=(3, 32, 32)),
        "alpha-bn": export_onnx(target, out_dir / "alpha_bn.onnx", mode="alpha-bn", source_weight=args.source_weight,
                                input_size=(3, 32, 32)),
        "features": export_onnx(target, out_dir / "features.onnx", mode="features", input_size=(3, 32, 32)),
    }
    export_s = time.perf_counter() - t0
    feats, labels, memory_desc = source_memory(model, card, args.memory_size)
    npc_cfg = dict(k=100, temperature=0.1, beta=0.1, capacity=args.capacity)

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def edge_model(path: Path) -> EdgeModel:
        return EdgeModel(path, args.providers, threads=args.threads, strict_providers=args.providers != "auto")

    runners = {
        "source": (tta.adapt(load(card) if card else model, "source").to(device),
                   EdgeSource(edge_model(reports["frozen"].path))),
        "alpha-bn": (tta.adapt(load(card) if card else standin_model(), "alpha-bn",
                               source_weight=args.source_weight).to(device),
                     EdgeAlphaBN(edge_model(reports["alpha-bn"].path))),
    }
    providers_used = runners["source"][1].model.providers
    torch_npc = tta.adapt(load(card) if card else standin_model(), "adanpc", **npc_cfg).to(device)
    torch_npc.set_source_memory(feats.to(device), labels.to(device), 10)
    edge_npc = EdgeAdaNPC(edge_model(reports["features"].path), feats.numpy(), labels.numpy(), **npc_cfg)
    runners["adanpc"] = (torch_npc, edge_npc)

    spec = load_spec(args.stream or DEFAULT_SPEC)
    stream = spec.build(batch_size=args.batch_size, n_per_domain=args.n_per_domain)
    stats = {name: {"torch_s": 0.0, "edge_s": 0.0, "agree": 0, "torch_wrong": 0, "edge_wrong": 0} for name in runners}
    n_images = 0
    for batch in stream:
        x, y = batch.x.float(), batch.y
        x_np = x.numpy()
        n_images += x.shape[0]
        for name, (torch_adapter, edge_adapter) in runners.items():
            sync()
            t = time.perf_counter()
            with torch.no_grad():
                pt = torch_adapter(x.to(device)).argmax(1).cpu().numpy()
            t1 = time.perf_counter()
            pe = edge_adapter(x_np).argmax(1)
            t2 = time.perf_counter()
            s = stats[name]
            s["torch_s"] += t1 - t
            s["edge_s"] += t2 - t1
            s["agree"] += int((pt == pe).sum())
            if y is not None:
                s["torch_wrong"] += int((pt != y.numpy()).sum())
                s["edge_wrong"] += int((pe != y.numpy()).sum())
    results = {
        "model": card or "stand-in: resnet20, random conv weights, BN recalibrated on 4000 FMNIST train images",
        "stream": spec.name, "images": n_images, "batch_size": stream.batch_size if hasattr(stream, "batch_size") else None,
        "threads": args.threads, "device": str(device), "edge_providers": providers_used,
        "source_weight": args.source_weight, "adanpc": {**npc_cfg, "memory": memory_desc},
        "export_s": round(export_s, 1), "adanpc_memory_rows_end": {"torch": torch_npc.memory.size, "edge": len(edge_npc)},
        "export_max_abs_diff": {k: r.max_abs_diff for k, r in reports.items()},
        "methods": {},
    }
    for name, s in stats.items():
        results["methods"][name] = {
            "agreement": s["agree"] / n_images, "disagreements": n_images - s["agree"],
            "torch_error_pct": 100 * s["torch_wrong"] / n_images, "edge_error_pct": 100 * s["edge_wrong"] / n_images,
            "torch_img_per_s": n_images / s["torch_s"], "edge_img_per_s": n_images / s["edge_s"],
            "edge_speedup": s["torch_s"] / s["edge_s"],
        }
    print(json.dumps(results, indent=2))
    print(f"\n| method | agreement | error % torch / edge | img/s PyTorch ({device}) | "
          f"img/s onnxruntime ({', '.join(providers_used)}) | ratio |")
    print("|---|---|---|---|---|---|")
    for name, r in results["methods"].items():
        print(f"| {name} | {100 * r['agreement']:.3f}% ({r['disagreements']} of {n_images}) | "
              f"{r['torch_error_pct']:.2f} / {r['edge_error_pct']:.2f} | {r['torch_img_per_s']:.0f} | "
              f"{r['edge_img_per_s']:.0f} | {r['edge_speedup']:.2f}x |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
