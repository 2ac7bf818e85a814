"""`tta calibrate-ccc`: the source model's accuracy on the CCC severity grid (`tta.streams.ccc`).

    tta calibrate-ccc --model resnet20-fmnist --out streams/fmnist-ccc.calibration.json
    tta calibrate-ccc --model CARD --n 200 --pairs gaussian_noise,snow,fog --out FILE

The file is what the `ccc` stream specs read (`calibration:`): it sets which corruption pairs and
severity paths hold each difficulty. Only the clean test split is read; nothing else is written.
"""

from __future__ import annotations

import argparse
import shlex
import time

from tta.errors import ConfigError, DataNotFoundError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "calibrate-ccc",
        help="measure a source model's accuracy on the CCC severity grid",
        description="Measure the model card's accuracy on every cell of the CCC severity grid, for single "
        "corruptions and ordered pairs, and write the calibration JSON the ccc stream specs read.",
    )
    p.add_argument("--model", default=None, help="model card name or path (default: the built-in card)")
    p.add_argument("--out", required=True, help="calibration file to write (JSON)")
    p.add_argument("--n", type=int, default=100, help="test images per grid cell (default 100)")
    p.add_argument("--pairs", default=None,
                   help="comma-separated corruptions to calibrate in pairs (default: those that reach the easy target)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None, help="folder of the clean dataset files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tta.models import DEFAULT_CARD, get_card, load
    from tta.streams.ccc import calibrate
    from tta.streams.corruptions import STANDARD_ORDER

    card = get_card(args.model or DEFAULT_CARD)
    if card.dataset not in ("fashion-mnist", "fmnist", "fashion_mnist"):
        raise DataNotFoundError(f"calibrate-ccc reads the clean test split of fashion-mnist; card {card.name} "
                                f"was trained on {card.dataset!r} (use tta.streams.ccc.calibrate from Python)")
    from tta.streams.fashion_mnist import load_fashion_mnist

    pairs = None if args.pairs is None else [c.strip() for c in args.pairs.split(",") if c.strip()]
    if pairs is not None:
        unknown = [c for c in pairs if c not in STANDARD_ORDER]
        if unknown:
            raise ConfigError(f"--pairs: unknown corruptions {unknown}")
    images, labels = load_fashion_mnist("test", args.data_dir)
    model = load(card, device=args.device)
    start = time.perf_counter()
    cal = calibrate(model, images, labels, pair_corruptions=pairs, n=args.n, seed=args.seed, device=args.device,
                    log=print)
    cal.meta.update({
        "model": card.name, "checkpoint_sha256": str(card.sha256), "dataset": "fashion-mnist test split",
        "command": "tta " + " ".join(shlex.quote(a) for a in (args.argv or [])),
        "seconds": round(time.perf_counter() - start, 1),
    })
    path = cal.save(args.out)
    print(f"wrote {path}: {len(cal.single)} corruptions, {len(cal.pairs)} ordered pairs, "
          f"{len(cal.grid)} grid severities, {args.n} images per cell, {time.perf_counter() - start:.0f} s")
    return 0
