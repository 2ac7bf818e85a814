"""`tta build-prototypes`: RMT's source class prototypes of a model card, stored as an artefact of the card.

    tta build-prototypes --model resnet20-fmnist      # -> resnet20-fmnist.prototypes.safetensors (see below)
    tta build-prototypes --model CARD --batch-size 200 --seed 0 --limit 20000 --out PATH

The reference recipe (RMT, Döbler et al. 2023; mariodoebler/test-time-adaptation): the mean pooled
feature of every class over the card's labelled training split (up to 100,000 images), the source
model set up as the adapter sets it up (BatchNorm with the statistics of each batch of
``--batch-size``, the test batch size), the images in a random order (``--seed``)
(`tta.adapters.rmt.compute_prototypes`).

The file goes where the card's generated files go (`ModelCard.artifact_output_path`: beside the card
when it is the user's own and writable, else the per-user ``models`` folder) unless ``--out`` names
one; ``tta run --adapter rmt`` finds it there (`ModelCard.artifact_path`).
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

from tta.cli.checks import check_out_file, check_positive

#: the reference caps the source features it averages at this many images
MAX_IMAGES = 100_000


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "build-prototypes",
        help="build RMT's source class prototypes for a model card",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="model card name or path")
    p.add_argument("--out", default=None,
                   help="output file (default: <card>.prototypes.safetensors where the card's generated files go)")
    p.add_argument("--batch-size", type=int, default=200, help="images per batch: the test batch size (default 200)")
    p.add_argument("--limit", type=int, default=MAX_IMAGES, help=f"at most this many images (default {MAX_IMAGES:,})")
    p.add_argument("--seed", type=int, default=0, help="seed of the image order")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None, help="folder of the source dataset files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from tta.adapters.rmt import PROTOTYPES_SUFFIX, compute_prototypes, save_prototypes
    from tta.models import get_card, load
    from tta.streams.source import source_split

    check_positive(batch_size=args.batch_size, limit=args.limit)
    card = get_card(args.model)
    out = check_out_file(Path(args.out) if args.out else card.artifact_output_path(PROTOTYPES_SUFFIX))
    assert out is not None
    images, labels = source_split(card.dataset, args.data_dir)
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(args.seed))[: args.limit]
    images, labels = images[order][:, : card.in_chans], labels[order]
    model = load(card, device=args.device)
    start = time.perf_counter()
    prototypes = compute_prototypes(model, images, labels, card.num_classes, batch_size=args.batch_size,
                                    feature_layer=card.feature_layer, device=args.device)
    save_prototypes(out, prototypes, {
        "card": card.name, "dataset": str(card.dataset), "split": "train", "images": str(images.shape[0]),
        "batch_size": str(args.batch_size), "seed": str(args.seed), "checkpoint_sha256": str(card.sha256),
        "command": "tta " + " ".join(shlex.quote(a) for a in (args.argv or [])),
    })
    print(f"wrote {out}: {prototypes.shape[0]} classes x {prototypes.shape[1]} feature dims from "
          f"{images.shape[0]} images, {time.perf_counter() - start:.1f} s")
    return 0
