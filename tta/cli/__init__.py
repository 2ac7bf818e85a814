"""`tta` command line: one subcommand per module listed in `SUBCOMMANDS`.

Each module `tta.cli.<name>` defines `register(subparsers)`, which adds its subparser and sets
`func=callable(args) -> int` as the parser default. The modules import nothing heavy at import time
(torch, timm, OpenCV are imported inside the commands), so `tta --help` and `tta list` start without
them and work on a torch-free install. A user error (`TTAError`: missing data, unknown adapter, bad
`--set` key, a broken plugin...) prints one line and exits with code 2, without a traceback; so does a
command that needs an extra that is not installed (the line names the pip command).
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS: tuple[str, ...] = ("run", "bench", "list_cmd", "train_source", "make_c", "export", "memory", "warmup", "ccc",
                               "serve")


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
        print(f"tta {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except ImportError as exc:
        from tta.dependencies import missing_dependency

        missing = missing_dependency(exc, f"tta {args.command}")
        if missing is None:
            raise
        print(f"tta {args.command}: error: {missing}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `tta list | head`: the reader left; say nothing more
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"tta {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


if __name__ == "__main__":
    sys.exit(main())
