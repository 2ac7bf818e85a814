"""`tta run`: one adapter over a stream: progress bar per domain, one error line per domain, the mean."""

from __future__ import annotations

import argparse
import dataclasses
import platform
import shlex
import sys
from typing import Any

import torch

from tta.errors import ConfigError


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by `tta run` and `tta bench`."""
    parser.add_argument("--model", default=None, help="model card name or YAML path (default: the built-in card)")
    parser.add_argument("--stream", default=None, help="stream spec name or YAML path (default: the built-in spec)")
    parser.add_argument("--preset", default=None,
                        help="adapter config preset: cifar10, cifar100, imagenet (default: the spec's preset)")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="override one adapter config field (repeatable), e.g. --set lr=1e-4")
    parser.add_argument("--batch-size", type=int, default=None, help="images per batch (default: the spec's)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--limit", type=int, default=None, metavar="N", help="images per domain (default: the spec's)")
    size.add_argument("--full", action="store_true", help="every image of every domain (the complete protocol)")
    parser.add_argument("--reset", default=None, help="reset policy: never, domain or N batches (default: the spec's)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    parser.add_argument("--amp", action="store_true", help="mixed precision (bf16 on CPU, fp16 on CUDA)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the stream order and of torch (default: the spec's)")
    parser.add_argument("--data-dir", default=None, help="data root holding the spec's data folder")
    parser.add_argument("--out", default=None, metavar="DIR", help="write results.json, results.csv, results.png here")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")


def parse_reset(value: str | None) -> str | int | None:
    if value is None or value in ("never", "domain"):
        return value
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(f"--reset must be never, domain or a number of batches, got {value!r}") from None
    if n < 1:
        raise ConfigError(f"--reset N needs N >= 1, got {n}")
    return n


def load_spec(args: argparse.Namespace) -> Any:
    import tta.streams as streams

    spec = streams.load_spec(args.stream or streams.DEFAULT_SPEC)
    if args.full:
        spec = dataclasses.replace(spec, n_per_domain=None)
    return spec


def build_stream(spec: Any, args: argparse.Namespace, seed: int | None) -> Any:
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    return spec.build(batch_size=args.batch_size, n_per_domain=args.limit, seed=seed, data_dir=args.data_dir)


def model_name(args: argparse.Namespace) -> str:
    import tta.models as models

    return args.model or models.DEFAULT_CARD


def load_model(args: argparse.Namespace) -> torch.nn.Module:
    """A fresh copy of the source model (adapters modify their model in place)."""
    import tta.models as models

    return models.load(model_name(args), device="cpu")


def card_defaults(adapter: str, overrides: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Config values that follow from the model card unless set explicitly: an adapter with a
    ``memory`` field (AdaNPC) uses the card's memory file (``models/<card>.memory.safetensors``),
    one with a ``fisher`` field (EATA) the card's Fisher file (``<card>.fisher.safetensors``)."""
    from tta.adapters import get_adapter_class
    from tta.adapters.teacher import card_defaults as teacher_card_defaults

    # ``key=card`` (e.g. CoTTA's ap=card -> the card's cotta_threshold) and ViDA's warmed-up
    # adapters beside the card (models/<card>.vida.safetensors) when they exist.
    overrides = teacher_card_defaults(get_adapter_class(adapter).Config, overrides, model_name(args))
    for key in ("memory", "fisher"):  # card artefacts: the config takes the card name
        if key in get_adapter_class(adapter).Config.field_names() and overrides.get(key) is None:
            overrides = {**overrides, key: model_name(args)}
    return overrides


def resolve_preset(args: argparse.Namespace, spec: Any) -> str | None:
    return args.preset or getattr(spec, "preset", None)


def run_seed(args: argparse.Namespace, spec: Any) -> int:
    return int(args.seed if args.seed is not None else getattr(spec, "seed", 0) or 0)


def meta(args: argparse.Namespace, spec: Any, seed: int, preset: str | None,
         configs: dict[str, Any]) -> dict[str, Any]:
    """What a results folder needs to be reproduced: command, model, stream, seed, adapter configs."""
    return {
        "command": "tta " + " ".join(shlex.quote(a) for a in (args.argv or [])),
        "model": model_name(args),
        "stream": getattr(spec, "name", str(args.stream)),
        "preset": preset,
        "seed": seed,
        "batch_size": args.batch_size or getattr(spec, "batch_size", None),
        "n_per_domain": args.limit if args.limit is not None else getattr(spec, "n_per_domain", None),
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
        "python": sys.version.split()[0],
        "configs": {name: cfg.to_dict() for name, cfg in configs.items()},
    }


def run(args: argparse.Namespace) -> int:
    from tta.adapters import adapt, get_adapter_class
    from tta.engine import run_stream, seed_everything
    from tta.engine.report import format_table, write_results

    overrides = get_adapter_class(args.adapter).Config.parse_assignments(args.assignments)
    reset = parse_reset(args.reset)
    spec = load_spec(args)
    seed = run_seed(args, spec)
    preset = resolve_preset(args, spec)
    stream = build_stream(spec, args, seed)

    seed_everything(seed)
    adapter = adapt(load_model(args), args.adapter, preset=preset, **card_defaults(args.adapter, overrides, args))
    print(f"tta run: {adapter.name} on {model_name(args)}, stream {getattr(spec, 'name', args.stream)} "
          f"({len(stream.domains)} domains, {sum(stream.domain_sizes.values())} images), preset {preset}, seed {seed}")
    result = run_stream(adapter, stream, device=args.device, amp=args.amp, reset=reset,
                        progress=args.progress, seed=seed,
                        log=None if args.progress else print)  # tqdm.write keeps the bars intact
    print(f"{result.images} images, {result.images_per_s:.1f} images/s, latency p50 {result.latency_ms_p50:.1f} ms "
          f"p95 {result.latency_ms_p95:.1f} ms, {result.steps} adaptation steps on {result.device}")
    if args.out:
        results = {adapter.name: result}
        written = write_results(results, args.out, title=f"{getattr(spec, 'name', '')} / {model_name(args)}",
                                meta=meta(args, spec, seed, preset, {adapter.name: adapter.config}))
        print(format_table(results))
        print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("run", help="run one adapter over a stream", description=__doc__)
    parser.add_argument("--adapter", required=True, help="adapter name (see `tta list`)")
    add_common_arguments(parser)
    parser.set_defaults(func=run)
