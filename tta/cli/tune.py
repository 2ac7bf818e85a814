"""`tta tune`: choose an adapter's hyperparameters on a validation stream, write them as a tuned preset.

    tta tune --adapter cotta --grid ap=0.6,0.8,0.92 --grid lr=3e-4,1e-3 [--model CARD]
             [--stream fmnist-c-val] [--limit N] [--seed S] [--set key=value] [--save tuned|FILE.yaml]
    tta bench --adapters cotta --preset tuned          # the test stream with the chosen values

Every grid point runs on the validation stream (default `fmnist-c-val`: the four CIFAR-10-C corruptions
held out from the 15 test corruptions); a stream whose spec does not declare ``role: validation`` is
refused before anything runs. Every point and its error is printed; the point with the lowest mean
validation error is written into the tuned preset (per card and adapter, with every point's error
and the command), in the per-user ``presets`` folder or the file given to --save, never into the
package. Points are stored under --out like matrix cells, so an interrupted tuning resumes.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
from pathlib import Path

from tta.errors import ConfigError

DEFAULT_STREAM = "fmnist-c-val"


def tune_command(args: argparse.Namespace) -> int:
    import dataclasses

    from tta.adapters import get_adapter_class
    from tta.models import DEFAULT_CARD, get_card
    from tta.protocol.presets import DATASET_PRESETS, output_path, save_entry
    from tta.protocol.tuning import check_validation_stream, format_points, parse_grid, tune
    from tta.provenance import provenance
    from tta.streams import load_spec

    spec = load_spec(args.stream)
    check_validation_stream(spec)  # before anything else is read or run
    cls = get_adapter_class(args.adapter)
    grid = parse_grid(args.grid, cls.Config)
    cls.Config.parse_assignments(args.assignments)  # fixed values checked up front
    clash = sorted(set(grid) & {a.split("=", 1)[0].strip().replace("-", "_") for a in args.assignments})
    if clash:
        raise ConfigError(f"{clash} is both tuned (--grid) and fixed (--set)")
    if args.preset is not None and args.preset not in DATASET_PRESETS:
        raise ConfigError(f"--preset must be a dataset preset ({', '.join(DATASET_PRESETS)}) to tune over, got "
                          f"{args.preset!r}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    card = get_card(args.model or DEFAULT_CARD)
    if card.num_classes != spec.num_classes:
        raise ConfigError(f"card {card.name} has {card.num_classes} classes, stream {spec.name} {spec.num_classes}")
    save_to = output_path(args.save)
    seed = spec.seed if args.seed is None else args.seed
    preset = args.preset or spec.preset
    out = Path(args.out) if args.out else Path("runs") / "tune" / card.name / cls.name
    data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else None
    limit = args.limit if args.limit is not None else spec.n_per_domain
    spec = dataclasses.replace(spec, n_per_domain=limit)

    n_points = 1
    for values in grid.values():
        n_points *= len(values)
    print(f"tta tune: {cls.name} on {card.name}, validation stream {spec.name} ({', '.join(spec.corruptions)}; "
          f"{limit} images per domain), {n_points} grid points, dataset preset {preset}, seed {seed}")
    record = tune(card=card, adapter=cls.name, spec=spec, grid=grid, fixed=list(args.assignments), seed=seed,
                  limit=limit, preset=preset, out=out, data_dir=data_dir, use_ray=args.ray)
    print()
    print(format_points(record))
    chosen = record["chosen"]
    entry = {
        "base_preset": preset,
        "values": {k: list(v) if isinstance(v, tuple) else v for k, v in {**_fixed(cls, args), **chosen["values"]}.items()},
        "checkpoint_sha256": card.sha256,
        "validation": {**record, "grid": {k: [list(x) if isinstance(x, tuple) else x for x in v]
                                          for k, v in record["grid"].items()}},
        "made": {"command": "tta " + " ".join(shlex.quote(a) for a in (args.argv or [])),
                 "date": datetime.date.today().isoformat(), **provenance()},
    }
    written = save_entry(save_to, card.name, cls.name, entry)
    values = ", ".join(f"{k}={v}" for k, v in entry["values"].items())
    print(f"\nchosen on {spec.name}: {values} (validation mean error {chosen['mean_error']:.2f}%)")
    print(f"wrote {written} (entry {card.name}/{cls.name}); use it with --preset {args.save}")
    return 0


def _fixed(cls, args: argparse.Namespace) -> dict:
    return {k: v for k, v in cls.Config.parse_assignments(args.assignments).items()}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tune", help="choose hyperparameters on a validation stream (a tuned preset)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="adapter to tune")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="values of one config key to try (repeatable; the grid is their product)")
    parser.add_argument("--model", default=None, help="model card (default: the built-in card)")
    parser.add_argument("--stream", default=DEFAULT_STREAM,
                        help=f"validation stream spec (default {DEFAULT_STREAM}); test streams are refused")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="images per domain (default: the spec's)")
    parser.add_argument("--seed", type=int, default=None, help="stream order and torch seed (default: the spec's)")
    parser.add_argument("--preset", default=None, help="dataset preset tuned over (default: the spec's)")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="a value fixed for every point (repeatable); written into the preset too")
    parser.add_argument("--save", default="tuned", metavar="NAME|FILE.yaml",
                        help="tuned preset to write: a name (per-user presets folder) or a .yaml path (default tuned)")
    parser.add_argument("--out", default=None, help="folder of the grid points' runs (default runs/tune/<card>/<adapter>)")
    parser.add_argument("--data-dir", default=None, help="data root (default $TTA_DATA_DIR / the per-user data folder)")
    parser.add_argument("--ray", action="store_true", help="one Ray task per grid point")
    parser.set_defaults(func=tune_command)
