"""`tta run`: one adapter over a stream (progress bar per domain, one error line per domain, the mean),
or over the frames of a video file or camera (`--video FILE` / `--camera N`, through the frame batcher).

    tta run --adapter tent [--model CARD] [--stream SPEC] [--limit N] [--out DIR]
    tta run --adapter bn --video clip.mp4 [--max-frames N] [--no-resize] --out runs/clip

Everything a user names is checked before the run starts (plugins, config keys, the stream and its
data, the card, the video source, that --out can be written), so a mistake costs no run and writes
nothing. With --out the folder gets results.json/csv/png (per-frame predictions.csv for video),
meta.json (command, versions, git commit, configs) and run.log (every logged line).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tta.cli.checks import check_out_dir, make_out_dir
from tta.errors import ConfigError

if TYPE_CHECKING:
    import torch

MAX_SEED = 2**32 - 1


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by `tta run` and `tta bench`."""
    parser.add_argument("--model", default=None, help="model card name or YAML path (default: the built-in card)")
    parser.add_argument("--stream", default=None, help="stream spec name or YAML path (default: the built-in spec)")
    parser.add_argument("--preset", default=None,
                        help="adapter config preset: cifar10, cifar100, imagenet (default: the spec's preset), or a "
                             "tuned preset written by `tta tune` (a name such as 'tuned', or its .yaml file)")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="override one adapter config field (repeatable), e.g. --set lr=1e-4")
    parser.add_argument("--batch-size", type=int, default=None, help="images per batch (default: the spec's)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--limit", type=int, default=None, metavar="N", help="images per domain (default: the spec's)")
    size.add_argument("--full", action="store_true", help="every image of every domain (the complete protocol)")
    parser.add_argument("--reset", default=None,
                        help="reset policy: never, domain or N (reset every N batches; RDumb: 1000) (default: the spec's)")
    parser.add_argument("--guard", nargs="?", const="", default=None, metavar="PRESET",
                        help="run under the collapse guard: health signals, rollback/reset (tta.engine.guard), "
                             "with the model card's guard settings where it has them; PRESET (over the card's settings): "
                             "default, or strict (decides at every batch: earlier action on a slow decay, ~4x "
                             "the guard's cost)")
    parser.add_argument("--guard-set", dest="guard_assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="collapse-guard setting (repeatable; implies --guard), e.g. --guard-set action=reset")
    parser.add_argument("--stream-set", dest="stream_assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="override a stream spec field (repeatable), e.g. --stream-set length=300000")
    parser.add_argument("--realtime", default=None, metavar="RATE",
                        help="real-time protocol (Alfarra et al., ICML 2024): a batch arrives every K source-model "
                             "forwards (Kx-source, e.g. 1x-source) or RATE batches per second; batches that arrive "
                             "while the adapter is busy are predicted without adapting and count in the error")
    parser.add_argument("--realtime-costs", default="calibrated", choices=("calibrated", "measured"),
                        help="real-time step costs: calibrated once per run (deterministic schedule) or each "
                             "step's measured time")
    parser.add_argument("--realtime-cost", dest="realtime_cost", action="append", default=[],
                        metavar="[ADAPTER=]COST",
                        help="pin an adapter's step cost in source forwards instead of calibrating it (repeats a "
                             "real-time run exactly, e.g. with the costs of a previous results.json); repeatable")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    parser.add_argument("--amp", action="store_true", help="mixed precision (bf16 on CPU, fp16 on CUDA)")
    parser.add_argument("--trim-heap-every", type=int, default=100, metavar="N",
                        help="give freed heap memory back to the system every N batches (less resident memory on "
                             "long streams; glibc malloc_trim; 0 = never; default 100)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the stream order and of torch (default: the spec's)")
    parser.add_argument("--data-dir", default=None, help="data root holding the spec's data folder")
    parser.add_argument("--out", default=None, metavar="DIR", help="write results.json, results.csv, results.png here")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    parser.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="MODULE",
                        help="import MODULE first (it registers adapters with tta.register_adapter); repeatable")


def load_plugins(args: argparse.Namespace) -> None:
    """Import every --plugin module (a failure is one PluginError line)."""
    from tta.plugins import import_plugin

    for module in getattr(args, "plugins", []) or []:
        import_plugin(module)


def parse_reset(value: str | None) -> str | int | None:
    if value is None or value in ("never", "domain"):
        return value
    try:
        n = int(value.split()[-1]) if value.strip().lower().startswith("every") else int(value)
    except (ValueError, IndexError):
        raise ConfigError(f"--reset must be never, domain or a number of batches, got {value!r}") from None
    if n < 1:
        raise ConfigError(f"--reset N needs N >= 1, got {n}")
    return n


def parse_realtime(args: argparse.Namespace, source: Any = None, adapter: str | None = None) -> Any:
    """The `RealtimeConfig` of --realtime / --realtime-costs / --realtime-cost for `adapter` (time unit:
    `source`'s forward), or None."""
    if getattr(args, "realtime", None) is None:
        if getattr(args, "realtime_cost", None):
            raise ConfigError("--realtime-cost needs --realtime RATE")
        return None
    from tta.engine.realtime import RealtimeConfig

    return RealtimeConfig(rate=args.realtime, costs=args.realtime_costs, source=source,
                          adapter_cost=pinned_cost(getattr(args, "realtime_cost", []) or [], adapter))


def pinned_cost(items: list[str], adapter: str | None) -> float | None:
    """The cost --realtime-cost gives `adapter` (``NAME=COST`` for one adapter, ``COST`` for all)."""
    found = None
    for item in items:
        name, _, value = item.rpartition("=")
        try:
            cost = float(value)
        except ValueError:
            raise ConfigError(f"--realtime-cost takes [ADAPTER=]COST (source forwards), got {item!r}") from None
        if not (cost > 0 and cost != float("inf")):
            raise ConfigError(f"--realtime-cost must be a positive number of source forwards, got {item!r}")
        if not name or name == adapter:
            found = cost
    return found


def parse_guard(args: argparse.Namespace) -> Any:
    """The `GuardConfig` of --guard / --guard-set (on top of the model card's guard settings), or None."""
    preset = getattr(args, "guard", None)
    if preset is None and not getattr(args, "guard_assignments", None):
        return None
    from tta.engine.guard import GuardConfig
    from tta.models import get_card

    return GuardConfig.parse(args.guard_assignments, base=get_card(model_name(args)).guard,
                             preset=preset or None)


def load_spec(args: argparse.Namespace) -> Any:
    import tta.streams as streams

    spec = streams.load_spec(args.stream or streams.DEFAULT_SPEC)
    if getattr(args, "stream_assignments", None):
        spec = spec.with_overrides(args.stream_assignments)
    if args.full:
        spec = dataclasses.replace(spec, n_per_domain=None)
    return spec


def check_sizes(args: argparse.Namespace) -> None:
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    trim = getattr(args, "trim_heap_every", 0)
    if trim is not None and trim < 0:
        raise ConfigError(f"--trim-heap-every must be >= 0 (0 = never), got {trim}")


def build_stream(spec: Any, args: argparse.Namespace, seed: int | None) -> Any:
    check_sizes(args)
    return spec.build(batch_size=args.batch_size, n_per_domain=args.limit, seed=seed, data_dir=args.data_dir)


def check_classes(card: Any, spec: Any) -> None:
    """The card's classifier must cover the spec's dataset (labels in [0, num_classes))."""
    if card.num_classes != spec.num_classes:
        raise ConfigError(f"model card {card.name} has {card.num_classes} classes but stream {spec.name} "
                          f"({spec.dataset}) has {spec.num_classes}; pick a card trained on {spec.dataset}")


def model_name(args: argparse.Namespace) -> str:
    import tta.models as models

    return args.model or models.DEFAULT_CARD


def load_model(args: argparse.Namespace) -> torch.nn.Module:
    """A fresh copy of the source model (adapters modify their model in place)."""
    import tta.models as models

    return models.load(model_name(args), device="cpu")


def card_defaults(adapter: str, overrides: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Config values that follow from the model card unless set explicitly: an adapter with a
    ``memory`` field (AdaNPC) uses the card's memory file (``<card>.memory.safetensors``, found by
    `ModelCard.artifact_path` whether the card was named or given as a path), one with a ``fisher``
    field (EATA) the card's Fisher file (``<card>.fisher.safetensors``, the same way)."""
    from tta.adapters import get_adapter_class
    from tta.adapters.adanpc import MEMORY_SUFFIX
    from tta.adapters.teacher import card_defaults as teacher_card_defaults
    from tta.models import get_card

    # ``key=card`` (e.g. CoTTA's ap=card -> the card's cotta_threshold) and ViDA's warmed-up
    # adapters (<card>.vida.safetensors) when they exist.
    overrides = teacher_card_defaults(get_adapter_class(adapter).Config, overrides, model_name(args))
    if "memory" in get_adapter_class(adapter).Config.field_names() and overrides.get("memory") is None:
        card = get_card(model_name(args))
        memory = card.artifact_path(MEMORY_SUFFIX)
        if memory is None:
            raise ConfigError(
                f"{adapter} needs the source memory of card {card.name} ({card.name}{MEMORY_SUFFIX}, looked for at "
                f"{card.artifact_output_path(MEMORY_SUFFIX)}): build it with `tta build-memory --model {model_name(args)}` "
                "or pass --set memory=PATH"
            )
        return {**overrides, "memory": str(memory)}
    if "fisher" in get_adapter_class(adapter).Config.field_names() and overrides.get("fisher") is None:
        from tta.adapters.eata import FISHER_SUFFIX

        card = get_card(model_name(args))
        fisher = card.artifact_path(FISHER_SUFFIX)
        if fisher is not None:
            return {**overrides, "fisher": str(fisher)}
        if overrides.get("fisher_alpha", 1.0) > 0:
            raise ConfigError(
                f"{adapter} needs the Fisher information of card {card.name} ({card.name}{FISHER_SUFFIX}, looked for "
                f"at {card.artifact_output_path(FISHER_SUFFIX)}): build it with `tta build-fisher --model "
                f"{model_name(args)}`, pass --set fisher=PATH, or use eta (--set fisher_alpha=0)"
            )
    return overrides


def resolve_preset(args: argparse.Namespace, spec: Any) -> str | None:
    return args.preset or getattr(spec, "preset", None)


def adapter_preset(preset: str | None, spec: Any, adapter: str, args: argparse.Namespace,
                   required: bool) -> tuple[str | None, dict[str, Any], Any]:
    """(dataset preset, tuned values, tuned entry) of `adapter` under `preset`: a dataset preset passes
    through; a tuned preset (`tta.protocol.presets`) gives the values chosen on a validation stream for
    this card. An adapter without tuned values runs at the spec's dataset preset unless `required`."""
    from tta.protocol.presets import is_tuned_name, resolve

    if not is_tuned_name(preset):
        return preset, {}, None
    from tta.models import get_card

    base, values, entry = resolve(preset, get_card(model_name(args)), adapter, required=required)
    if entry is None:
        return getattr(spec, "preset", None), {}, None
    return base, values, entry


def run_seed(args: argparse.Namespace, spec: Any) -> int:
    seed = int(args.seed if args.seed is not None else getattr(spec, "seed", 0) or 0)
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"--seed must be in 0..{MAX_SEED}, got {seed}")
    return seed


def meta(args: argparse.Namespace, spec: Any, seed: int, preset: str | None,
         configs: dict[str, Any]) -> dict[str, Any]:
    """What a results folder needs to be reproduced: command, package version and git commit, model,
    stream, seed, adapter configs."""
    import torch

    from tta.provenance import provenance

    return {
        "command": "tta " + " ".join(shlex.quote(a) for a in (args.argv or [])),
        **provenance(),
        "model": model_name(args),
        "stream": getattr(spec, "name", str(getattr(args, "stream", None))),
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
    import logging

    from tta.adapters import adapt, get_adapter_class
    from tta.cli.runlog import run_logging
    from tta.engine import resolve_device, seed_everything
    from tta.models import get_card

    load_plugins(args)
    overrides = get_adapter_class(args.adapter).Config.parse_assignments(args.assignments)
    reset = parse_reset(args.reset)
    guard = parse_guard(args)
    realtime = parse_realtime(args)
    video = args.video is not None or args.camera is not None
    if video and realtime is not None:
        raise ConfigError("--realtime applies to streams; frames from --video/--camera are processed as they come")
    if video:
        from tta.cli.video import check_video_arguments, open_frames

        check_video_arguments(args)
        spec, seed, preset = None, run_seed(args, None), args.preset
    else:
        spec = load_spec(args)
        seed = run_seed(args, spec)
        preset = resolve_preset(args, spec)
    card = get_card(model_name(args))
    if video:
        frames = open_frames(args, card)
        stream = None
    else:
        check_classes(card, spec)
        stream = build_stream(spec, args, seed)
    resolve_device(args.device)  # an unknown or absent device fails before anything is written
    out = check_out_dir(args.out)

    base, tuned, _ = adapter_preset(preset, spec, get_adapter_class(args.adapter).name, args, required=True)
    seed_everything(seed)
    adapter = adapt(load_model(args), args.adapter, preset=base,
                    **card_defaults(args.adapter, {**tuned, **overrides}, args))
    with run_logging(make_out_dir(out)) as logger:
        if video:
            from tta.cli.video import run_frames

            return run_frames(args, adapter, card, frames, out, meta(args, None, seed, preset,
                                                                     {adapter.name: adapter.config}), logger)
        if realtime is not None:  # the time unit: a forward of the source model, loaded fresh
            realtime = parse_realtime(args, source=load_model(args), adapter=adapter.name)
        return _run_stream(args, adapter, spec, stream, seed, preset, reset, guard, realtime, out, logger)


def _run_stream(args: argparse.Namespace, adapter: Any, spec: Any, stream: Any, seed: int, preset: str | None,
                reset: Any, guard: Any, realtime: Any, out: Path | None, logger: Any) -> int:
    from tta.engine import run_stream
    from tta.engine.report import format_table, write_results

    logger.info(f"tta run: {adapter.name} on {model_name(args)}, stream {getattr(spec, 'name', args.stream)} "
                f"({len(stream.domains)} domains, {sum(stream.domain_sizes.values())} images), preset {preset}, "
                f"seed {seed}")
    result = run_stream(adapter, stream, device=args.device, amp=args.amp, reset=reset, guard=guard,
                        realtime=realtime, progress=args.progress, seed=seed, log=logger.info,
                        trim_heap_every=args.trim_heap_every)
    logger.info(f"{result.images} images, {result.images_per_s:.1f} images/s, latency p50 {result.latency_ms_p50:.1f} ms "
                f"p95 {result.latency_ms_p95:.1f} ms, {result.steps} adaptation steps on {result.device}")
    if out is not None:
        results = {adapter.name: result}
        written = write_results(results, out, title=f"{getattr(spec, 'name', '')} / {model_name(args)}",
                                meta=meta(args, spec, seed, preset, {adapter.name: adapter.config}))
        logger.info(format_table(results))
        logger.info("wrote " + ", ".join(str(p) for p in written.values()))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("run", help="run one adapter over a stream, a video file or a camera",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="adapter name (see `tta list`)")
    add_common_arguments(parser)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--video", default=None, metavar="FILE", help="frames of a video file instead of a stream")
    source.add_argument("--camera", type=int, default=None, metavar="N", help="frames of camera N instead of a stream")
    parser.add_argument("--max-frames", type=int, default=None, metavar="N", help="video/camera: stop after N frames")
    parser.add_argument("--no-resize", dest="resize", action="store_false",
                        help="video/camera: frames must already have the card's input size (else an error)")
    parser.add_argument("--max-wait-ms", type=float, default=50.0,
                        help="video/camera: flush a partial micro-batch after this wait (default 50)")
    parser.set_defaults(func=run)
