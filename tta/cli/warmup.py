"""`tta warmup-adapters`: source warm-up of ViDA's adapters for a model card.

Injects ViDA's low-/high-rank adapters into the card's model, trains only the adapters with
cross-entropy on the card's source training split (Fashion-MNIST), and writes the adapter weights as
``<card>.vida.safetensors`` where `ModelCard.artifact_output_path` says (beside a user's own card, else
the per-user models folder; metadata: ranks, steps, the command). `tta run --adapter vida` picks them
up from there (`ModelCard.artifact_path`), or name a file with ``--set adapter_weights=PATH``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

from tta.cli.checks import check_out_file, check_positive
from tta.errors import ConfigError


def warmup(args: argparse.Namespace) -> int:
    import torch

    from tta.adapters.vida import VIDA_SUFFIX, save_adapter_weights, warmup_adapters
    from tta.models import get_card, load
    from tta.streams.fashion_mnist import load_fashion_mnist

    if args.threads:
        torch.set_num_threads(args.threads)
    card = get_card(args.model)
    check_positive(steps=args.steps, batch_size=args.batch_size, low_rank=args.low_rank, high_rank=args.high_rank,
                   limit_train=args.limit_train)
    if not args.lr > 0:
        raise ConfigError(f"--lr must be > 0, got {args.lr}")
    out = check_out_file(Path(args.out) if args.out else card.artifact_output_path(VIDA_SUFFIX))
    if card.dataset not in (None, "fashion-mnist"):
        raise ConfigError(f"warm-up data for dataset {card.dataset!r} is not available here (only fashion-mnist)")
    images, labels = load_fashion_mnist("train", args.data_dir)
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(images.shape[0], generator=g)[: args.limit_train]
    x = torch.from_numpy(images).permute(0, 3, 1, 2)[idx].float().div_(255)
    x = x[:, : card.in_chans]
    y = torch.from_numpy(labels)[idx]
    model = load(card, device=args.device)
    start = time.time()
    stats = warmup_adapters(model, x, y, low_rank=args.low_rank, high_rank=args.high_rank, steps=args.steps,
                            batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                            log=print if args.progress else None)
    stats["seconds"] = round(time.time() - start, 1)
    command = "tta " + " ".join(shlex.quote(a) for a in (args.argv or []))
    save_adapter_weights(model, out, {"card": card.name, "low_rank": args.low_rank, "high_rank": args.high_rank,
                                      "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                                      "train_images": int(x.shape[0]), "seed": args.seed, "command": command,
                                      **stats})
    print(json.dumps({"out": str(out), **stats}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("warmup-adapters", help="source warm-up of ViDA's adapters for a model card",
                                   description=__doc__)
    parser.add_argument("--model", required=True, help="model card name or YAML path")
    parser.add_argument("--out", default=None, help="output file (default: <card>.vida.safetensors beside a user's card, else in the per-user models folder)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--low-rank", type=int, default=1)
    parser.add_argument("--high-rank", type=int, default=128)
    parser.add_argument("--limit-train", type=int, default=20000, help="training images sampled from (default 20000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: the installed dataset)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.set_defaults(func=warmup)
