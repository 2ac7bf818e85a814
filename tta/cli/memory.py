"""`tta build-memory`: AdaNPC's source memory (normalised features + true labels) for a model card.

    tta build-memory --model resnet20-fmnist            # -> <per-user models folder>/resnet20-fmnist.memory.safetensors
    tta build-memory --model my-cards/r20.yaml          # -> my-cards/r20.memory.safetensors (beside a user's card)
    tta build-memory --model CARD --dtype float16 --limit 20000 --out PATH

The default output is `ModelCard.artifact_output_path(".memory.safetensors")`; `tta run --adapter
adanpc` finds it again with `ModelCard.artifact_path`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tta.cli.checks import check_out_file, check_positive


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "build-memory",
        help="build AdaNPC's source feature memory for a model card",
        description="Extract L2-normalised pooled features of the card's source training split with their "
        "true labels and write them as <card>.memory.safetensors (beside a user's card, else in the per-user "
        "models folder).",
    )
    p.add_argument("--model", required=True, help="model card name or path")
    p.add_argument("--out", default=None, help="output file (default: see above)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="row storage dtype")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None, help="folder of the source dataset files")
    p.set_defaults(func=run)


def _source_split(dataset: str | None, data_dir: str | None):
    """(uint8 NCHW images, int64 labels) of the card's source training split (`tta.streams.source`)."""
    from tta.streams.source import source_split

    return source_split(dataset, data_dir)


def run(args: argparse.Namespace) -> int:
    import torch

    from tta.adapters.adanpc import MEMORY_SUFFIX, build_source_memory, save_memory
    from tta.models import get_card, load

    card = get_card(args.model)
    check_positive(limit=args.limit, batch_size=args.batch_size)
    out = check_out_file(Path(args.out) if args.out else card.artifact_output_path(MEMORY_SUFFIX))
    images, labels = _source_split(card.dataset, args.data_dir)
    if args.limit is not None:
        images, labels = images[: args.limit], labels[: args.limit]
    model = load(card, device=args.device)
    start = time.perf_counter()
    dtype = torch.float16 if args.dtype == "float16" else torch.float32
    feats, labels = build_source_memory(model, images, labels, batch_size=args.batch_size, dtype=dtype,
                                        device=args.device)
    save_memory(out, feats, labels, card.num_classes, {
        "card": card.name, "dataset": str(card.dataset), "split": "train", "rows": str(len(labels)),
        "checkpoint_sha256": str(card.sha256), "dtype": args.dtype,
    })
    print(f"wrote {out}: {feats.shape[0]} rows x {feats.shape[1]} dims ({args.dtype}), "
          f"{card.num_classes} classes, {time.perf_counter() - start:.1f} s")
    return 0
