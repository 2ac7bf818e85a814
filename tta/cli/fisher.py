"""`tta build-fisher`: EATA's Fisher information of a model card, stored as an artefact of the card.

    tta build-fisher --model resnet20-fmnist          # -> resnet20-fmnist.fisher.safetensors (see below)
    tta build-fisher --model CARD --samples 2000 --batch-size 200 --seed 0 --out PATH

The reference recipe (EATA, Niu et al. 2022; mariodoebler/test-time-adaptation): a random subset
of ``--samples`` clean training images of the card's dataset, in batches of the test batch size,
through the adapter's model set-up (BatchNorm with batch statistics); the squared gradient of the
cross-entropy to the model's own argmax labels, averaged over the batches
(`tta.adapters.eata.compute_fisher`).

The file goes where the card's generated files go (`ModelCard.artifact_output_path`: beside the card
when it is the user's own and writable, else the per-user ``models`` folder) unless ``--out`` names
one; EATA finds it there by the card's name (``fisher=CARD``).
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

from tta.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "build-fisher",
        help="build EATA's Fisher information for a model card",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="model card name or path")
    p.add_argument("--out", default=None,
                   help="output file (default: <card>.fisher.safetensors where the card's generated files go)")
    p.add_argument("--samples", type=int, default=2000, help="clean training images drawn at random (default 2000)")
    p.add_argument("--batch-size", type=int, default=200, help="images per batch: the test batch size (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random subset")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None, help="folder of the source dataset files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from tta.adapters.eata import FISHER_SUFFIX, compute_fisher, save_fisher
    from tta.cli.memory import _source_split
    from tta.models import get_card, load

    if args.samples < 1 or args.batch_size < 1:
        raise ConfigError(f"--samples and --batch-size must be >= 1, got {args.samples}, {args.batch_size}")
    card = get_card(args.model)
    images, _ = _source_split(card.dataset, args.data_dir)
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(args.seed))[: args.samples]
    images = images[order][:, : card.in_chans]
    model = load(card, device=args.device)
    start = time.perf_counter()
    fisher = compute_fisher(model, images, batch_size=args.batch_size, device=args.device)
    out = Path(args.out) if args.out else card.artifact_output_path(FISHER_SUFFIX)
    command = "tta " + " ".join(shlex.quote(a) for a in (args.argv or []))
    save_fisher(out, fisher, {
        "card": card.name, "dataset": str(card.dataset), "split": "train", "samples": str(images.shape[0]),
        "batch_size": str(args.batch_size), "seed": str(args.seed), "checkpoint_sha256": str(card.sha256),
        "command": command,
    })
    total = sum(f.numel() for f in fisher.values())
    mean = sum(float(f.sum()) for f in fisher.values()) / max(total, 1)
    print(f"wrote {out}: {len(fisher)} tensors, {total} values (mean {mean:.3g}) from {images.shape[0]} images, "
          f"{time.perf_counter() - start:.1f} s")
    return 0
