"""`tta train-source`: train a source model on Fashion-MNIST and write its checkpoint + model card."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from tta.cli.checks import check_out_file
from tta.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="fashion-mnist", help="training set (fashion-mnist)")
    parser.add_argument("--arch", default="resnet20",
                        help="built-in (resnet20, wrn28_10, vit_patch4_32), timm:<name> or torchvision:<name>")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", default="models/resnet20-fmnist",
                        help="output stem: writes OUT.safetensors and OUT.yaml; the card is named after OUT")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default=None, help="default: adamw for ViTs, else sgd")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default 0.1 sgd / 1e-3 adamw)")
    parser.add_argument("--weight-decay", type=float, default=None, help="default 5e-4 sgd / 0.05 adamw")
    parser.add_argument("--eval-every", type=int, default=0, help="test-split accuracy every N epochs (0: end only)")
    parser.add_argument("--arch-kwargs", type=json.loads, default={},
                        help='JSON dict of architecture options, e.g. \'{"embed_dim": 128, "depth": 6}\'')
    parser.add_argument("--data-dir", default=None, help="folder with the dataset files (default: installed dataset)")
    parser.add_argument("--limit-train", type=int, default=None, help="use only the first N training images")
    parser.add_argument("--limit-test", type=int, default=None, help="evaluate on the first N test images only")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is faster on an oversubscribed machine)")
    parser.add_argument("--objective", choices=("ce", "knn"), default="ce",
                        help="ce: cross-entropy of the linear head; knn: AdaNPC's kNN-vote objective against a queue "
                        "of recent training features (head = linear probe fitted afterwards; writes the AdaNPC "
                        "memory OUT.memory.safetensors)")
    parser.add_argument("--knn-queue", type=int, default=1000, help="knn: queue rows (default 1000)")
    parser.add_argument("--knn-k", type=int, default=10, help="knn: neighbours voting in training (default 10)")
    parser.add_argument("--memory-rows", type=int, default=None,
                        help="knn: rows of the written AdaNPC memory (first N training images; default all)")
    parser.add_argument("--memory-dtype", choices=("float32", "float16"), default="float16",
                        help="knn: row dtype of the written AdaNPC memory (default float16)")
    parser.add_argument("--device", default="cpu",
                        help="training device, e.g. cuda (evaluation and the card's figures always run on the CPU)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def canonical_command(args: argparse.Namespace) -> str:
    """The full command line, every option spelled out, so the card states exactly what was run."""
    parts = [f"--dataset {args.dataset}", f"--arch {args.arch}", f"--epochs {args.epochs}", f"--out {args.out}",
             f"--seed {args.seed}", f"--batch-size {args.batch_size}"]
    for flag, value in (("--optimizer", args.optimizer), ("--lr", args.lr), ("--weight-decay", args.weight_decay),
                        ("--data-dir", args.data_dir), ("--limit-train", args.limit_train),
                        ("--limit-test", args.limit_test), ("--threads", args.threads)):
        if value is not None:
            parts.append(f"{flag} {value}")
    if args.eval_every:
        parts.append(f"--eval-every {args.eval_every}")
    if args.device != "cpu":
        parts.append(f"--device {args.device}")
    if args.objective != "ce":
        parts.append(f"--objective {args.objective} --knn-queue {args.knn_queue} --knn-k {args.knn_k} "
                     f"--memory-dtype {args.memory_dtype}")
        if args.memory_rows is not None:
            parts.append(f"--memory-rows {args.memory_rows}")
    if args.arch_kwargs:
        parts.append("--arch-kwargs " + shlex.quote(json.dumps(args.arch_kwargs, separators=(",", ":"))))
    return "tta train-source " + " ".join(parts)


def run(args: argparse.Namespace) -> int:
    import torch

    from tta.models.training import DATASETS, TrainConfig, train_source

    if args.dataset not in DATASETS:
        raise ConfigError(f"--dataset: unknown {args.dataset!r}; known: {', '.join(sorted(DATASETS))}")
    check_out_file(args.out)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(
        arch=args.arch, out=args.out, dataset=args.dataset, epochs=args.epochs, batch_size=args.batch_size,
        optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed,
        eval_every=args.eval_every, limit_train=args.limit_train, limit_test=args.limit_test, arch_kwargs=args.arch_kwargs, data_dir=args.data_dir, command=canonical_command(args),
        objective=args.objective, knn_queue=args.knn_queue, knn_k=args.knn_k, memory_rows=args.memory_rows,
        memory_dtype=args.memory_dtype, device=args.device,
    )
    train_source(cfg, progress=not args.no_progress)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train-source", help=__doc__.split(":", 1)[1].strip(), description=__doc__)
    add_arguments(parser)
    parser.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="tta train-source", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
