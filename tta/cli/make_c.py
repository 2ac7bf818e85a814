"""`tta make-c`: write a corrupted ("-C") copy of a dataset in the CIFAR-10-C layout.

    tta make-c --dataset fashion-mnist [--out DIR] [--severities 1-5]
               [--corruptions gaussian_noise,fog] [--limit N] [--seed S]
    tta make-c --dataset image-folder --source DIR --out DIR   # <class>/*.jpg, images <= 64 px, one size

See `tta.streams.generate` for the layout, resumption and atomic writes.
"""

from __future__ import annotations

import argparse
import time

from tta.cli.checks import check_out_dir
from tta.errors import ConfigError

DATASETS = ("fashion-mnist", "image-folder")


def parse_severities(text: str) -> list[int]:
    """"1-5", "5", "1,3,5" or "2-3,5" -> sorted severities."""
    out: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
                out.update(range(lo, hi + 1))
            elif part:
                out.add(int(part))
    except ValueError as exc:
        raise ConfigError(f"--severities: expected e.g. '1-5', '5' or '1,3,5', got {text!r}") from exc
    if not out or any(s not in range(1, 6) for s in out):
        raise ConfigError(f"--severities must name severities in 1..5, got {text!r}")
    return sorted(out)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "make-c",
        help="generate a corrupted '-C' set (CIFAR-10-C layout)",
        description="Corrupt a dataset with the CIFAR-10-C corruptions and write <corruption>.npy + labels.npy "
        "(resumable, atomic writes).",
    )
    p.add_argument("--dataset", required=True, choices=DATASETS, help="source dataset")
    p.add_argument("--out", default=None,
                   help="output folder (fashion-mnist default: <data root>/fashion-mnist-c, where the "
                        "fmnist-c-* specs look: $TTA_DATA_DIR, else the per-user data folder)")
    p.add_argument("--source", default=None, help="Fashion-MNIST idx folder / image folder (default: the installed set)")
    p.add_argument("--split", default="test", choices=("test", "train"), help="Fashion-MNIST split (default test)")
    p.add_argument("--severities", default="1-5", help="severities to generate, e.g. 1-5, 5, 1,3,5 (default 1-5)")
    p.add_argument("--corruptions", default=None, help="comma-separated names (default: the 15 standard ones)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _load(args: argparse.Namespace):
    if args.dataset == "fashion-mnist":
        from tta.streams.fashion_mnist import load_fashion_mnist

        return load_fashion_mnist(args.split, args.source)
    if args.source is None:
        raise ConfigError("--dataset image-folder needs --source DIR")
    import numpy as np

    from tta.streams.datasets import image_folder

    domain = image_folder(args.source)
    if domain.labels is None:
        raise ConfigError(f"{args.source}: make-c needs class sub-folders (<class>/*.jpg) for labels")
    n = len(domain) if args.limit is None else min(args.limit, len(domain))
    return domain.images(np.arange(n)), domain.labels[:n]


def run(args: argparse.Namespace) -> int:
    from tta.streams.corruptions import CORRUPTIONS, STANDARD_ORDER
    from tta.streams.generate import make_c

    if args.out is None:
        if args.dataset != "fashion-mnist":
            raise ConfigError("--dataset image-folder needs --out DIR")
        from tta.paths import data_root

        args.out = str(data_root() / "fashion-mnist-c")
    check_out_dir(args.out)
    severities = parse_severities(args.severities)
    corruptions = STANDARD_ORDER if args.corruptions is None else tuple(c.strip() for c in args.corruptions.split(",") if c.strip())
    unknown = [c for c in corruptions if c not in CORRUPTIONS]
    if unknown:
        raise ConfigError(f"--corruptions: unknown {unknown}; known: {', '.join(CORRUPTIONS)}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    images, labels = _load(args)
    if args.limit is not None:
        images, labels = images[: args.limit], labels[: args.limit]
    start = time.perf_counter()
    status = make_c(
        images, labels, args.out, corruptions=corruptions, severities=severities, seed=args.seed,
        dataset=args.dataset, progress=not args.no_progress,
    )
    elapsed = time.perf_counter() - start
    written = [c for c, s in status.items() if s == "written"]
    kept = [c for c, s in status.items() if s == "kept"]
    print(
        f"make-c: {len(images)} images x {len(severities)} severities -> {args.out}: "
        f"{len(written)} corruptions written, {len(kept)} kept (complete), {elapsed:.1f} s"
    )
    return 0
