"""`tta` command line: one subcommand per module listed in `SUBCOMMANDS`.

Each module `tta.cli.<name>` defines `register(subparsers)`, which adds its subparser and sets
`func=callable(args) -> int` as the parser default. Modules are imported lazily so that a subcommand
with heavy imports costs nothing to the others. A user error (`TTAError`: missing data, unknown
adapter, bad `--set` key...) prints one line and exits with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS: tuple[str, ...] = ("run", "bench", "list_cmd", "train_source", "make_c", "export", "memory", "warmup",
                               "fisher")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tta", description="Continual test-time adaptation runtime.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"tta.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from tta.errors import TTAError

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv  # recorded in result files
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except TTAError as exc:
        print(f"tta {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tta {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
