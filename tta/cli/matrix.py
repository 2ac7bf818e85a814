"""`tta matrix`: a results table of cards x settings x adapters x seeds, from a plan file.

    tta matrix bench/matrix.yaml --out runs/matrix            # run what is missing, then write the table
    tta matrix bench/matrix.yaml --out runs/matrix --part cheap --part tuned
    tta matrix bench/matrix.yaml --out runs/matrix --ray [--address ray://host:10001] [--workers 2]
    tta matrix bench/matrix.yaml --out runs/matrix --table-only  # the table of what is stored
    tta matrix bench/matrix.yaml --dry-run                     # the cells, and which are done
    tta matrix bench/matrix.yaml --out runs/matrix --compare runs/matrix-ray   # same results in both?

Every cell writes meta.json (every protocol choice: stream, setting, images per domain, order, reset,
batch, seed, card checksum and normalisation, adapter config, package version and commit) and
result.json under --out; a rerun skips finished cells, so a long matrix can be stopped and resumed, and
several runners can share one --out. The table (mean +- std over seeds, cost and memory relative to the
source model, the protocol above it) is printed and written to <out>/table.md. See tta.protocol.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tta.cli.checks import check_out_dir
from tta.errors import ConfigError


def matrix(args: argparse.Namespace) -> int:
    from tta.protocol.matrix import compare, load_cell, run_matrix
    from tta.protocol.plan import load_plan
    from tta.protocol.table import render
    from tta.fileio import write_text_atomic

    plan = load_plan(args.plan).select(args.parts)
    cells = plan.cells()
    out = Path(args.out)
    if args.dry_run:
        total_cpu = 0.0
        for part in plan.parts:
            part_cells = part.cells(plan.cost_stream, plan.cost_limit)
            stored = [s for s in (load_cell(out, c) for c in part_cells) if s is not None]
            cpu = sum(s["meta"].get("cpu_seconds") or 0.0 for s in stored)
            total_cpu += cpu
            print(f"{part.name}: {len(part_cells)} cells ({sum(c.kind == 'cost' for c in part_cells)} cost), "
                  f"{len(stored)} done, {cpu / 3600:.2f} CPU-hours spent")
        done = sum(load_cell(out, c) is not None for c in cells)
        print(f"plan {plan.name}: {len(cells)} cells, {done} done, {len(cells) - done} to run; "
              f"{total_cpu / 3600:.2f} CPU-hours spent")
        return 0
    if args.compare:
        compared, differences = compare(cells, out, Path(args.compare))
        for line in differences:
            print(line)
        print(f"{compared} stream cells stored in both {out} and {args.compare}: "
              + ("every per-domain error, step count and prediction identical" if not differences
                 else f"{len(differences)} difference(s)"))
        return 1 if differences or not compared else 0
    check_out_dir(str(out))
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    if (args.address or args.workers) and not args.ray:
        raise ConfigError("--address and --workers go with --ray")
    counts = {"failed": 0}
    if not args.table_only:
        data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else None
        counts = run_matrix(cells, out, data_dir=data_dir, use_ray=args.ray, address=args.address,
                            workers=args.workers)
    table = render(plan, out)
    write_text_atomic(out / "table.md", table)
    print(table)
    print(f"wrote {out / 'table.md'}")
    return 1 if counts["failed"] else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("matrix", help="run a cards x settings x adapters x seeds plan and tabulate it",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plan", help="plan YAML file (see tta.protocol.plan; bench/matrix.yaml makes BENCHMARKS.md's table)")
    parser.add_argument("--out", default=os.path.join("runs", "matrix"), help="results folder (default runs/matrix)")
    parser.add_argument("--part", dest="parts", action="append", default=[], metavar="NAME",
                        help="run only this part of the plan (repeatable)")
    parser.add_argument("--data-dir", default=None, help="data root (default $TTA_DATA_DIR / the per-user data folder)")
    parser.add_argument("--ray", action="store_true", help="one Ray task per cell (local instance unless --address)")
    parser.add_argument("--address", default=None, help="address of an existing Ray cluster (with --ray)")
    parser.add_argument("--workers", type=int, default=None, help="CPUs of the local Ray instance (with --ray)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="list the cells and which are done; run nothing")
    mode.add_argument("--table-only", action="store_true", help="write the table of the stored results; run nothing")
    mode.add_argument("--compare", default=None, metavar="DIR",
                      help="compare the stored results with another run's folder (errors, steps, every prediction)")
    parser.set_defaults(func=matrix)
