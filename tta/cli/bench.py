"""`tta bench`: every adapter on the same stream (fresh model each); table, results.json/csv and a plot.

The results folder is rewritten as each adapter finishes (an interrupted benchmark keeps what it
measured); an adapter that fails is reported (traceback in run.log), the others still run, and the
command exits 1.
"""

from __future__ import annotations

import argparse
from typing import Any

from tta.cli.run import (
    adapter_preset,
    add_common_arguments,
    build_stream,
    card_defaults,
    check_classes,
    load_model,
    load_plugins,
    load_spec,
    meta,
    model_name,
    parse_guard,
    parse_realtime,
    parse_reset,
    resolve_preset,
    run_seed,
)
from tta.cli.checks import check_out_dir, make_out_dir
from tta.errors import ConfigError, TTAError


def select_adapters(spec: str) -> list[str]:
    """``all`` or a comma-separated list of registered names (unknown names raise ConfigError)."""
    from tta.adapters import get_adapter_class, list_adapters

    if spec.strip().lower() == "all":
        return list_adapters()
    names = [get_adapter_class(n).name for n in spec.split(",") if n.strip()]
    if not names:
        raise ConfigError("--adapters needs at least one adapter name (or 'all')")
    return list(dict.fromkeys(names))


def split_assignments(assignments: list[str], adapters: list[str]) -> dict[str, dict[str, Any]]:
    """Typed config overrides per adapter.

    ``ADAPTER.key=value`` applies to that adapter only (it must be selected and have the key);
    ``key=value`` applies to every selected adapter whose config has the key (at least one must).
    """
    from tta.adapters import get_adapter_class

    scoped: dict[str, list[str]] = {a: [] for a in adapters}
    for item in assignments:
        key = item.split("=", 1)[0]
        if "." in key:
            scope, rest = item.split(".", 1)
            name = get_adapter_class(scope).name
            if name not in scoped:
                raise ConfigError(f"--set {item!r}: adapter {name!r} is not among the benchmarked adapters")
            scoped[name].append(rest)
            continue
        takers = [a for a in adapters if key.strip().replace("-", "_") in get_adapter_class(a).Config.field_names()]
        if not takers:
            raise ConfigError(f"--set {item!r}: no selected adapter has a config key {key!r}")
        for a in takers:
            scoped[a].append(item)
    return {a: get_adapter_class(a).Config.parse_assignments(items) for a, items in scoped.items()}


def bench(args: argparse.Namespace) -> int:
    """Every adapter in turn; results are rewritten after each one, a failing adapter is reported and skipped."""
    from tta.adapters import adapt
    from tta.cli.runlog import run_logging
    from tta.engine import resolve_device, run_stream, seed_everything
    from tta.engine.report import format_table, write_results
    from tta.models import get_card

    load_plugins(args)
    names = select_adapters(args.adapters)
    overrides = split_assignments(args.assignments, names)
    reset = parse_reset(args.reset)
    guard = parse_guard(args)
    realtime = parse_realtime(args)
    spec = load_spec(args)
    seed = run_seed(args, spec)
    preset = resolve_preset(args, spec)
    check_classes(get_card(model_name(args)), spec)
    stream = build_stream(spec, args, seed)
    resolve_device(args.device)  # an unknown or absent device fails before anything is written
    out = check_out_dir(args.out)
    explicit = args.adapters.strip().lower() != "all"
    title = f"{getattr(spec, 'name', '')} / {model_name(args)}"

    results, configs, failed = {}, {}, {}
    with run_logging(make_out_dir(out)) as logger:
        logger.info(f"tta bench: {', '.join(names)} on {model_name(args)}, stream {getattr(spec, 'name', args.stream)} "
                    f"({len(stream.domains)} domains, {sum(stream.domain_sizes.values())} images), preset {preset}, "
                    f"seed {seed}")
        for name in names:
            base, tuned, entry = adapter_preset(preset, spec, name, args, required=explicit and len(names) == 1)
            if preset != base and entry is None:
                logger.info(f"[{name}] no tuned values in preset {preset!r} for this card: dataset preset {base}")
            seed_everything(seed)  # the same global RNG state for every adapter
            try:
                adapter = adapt(load_model(args), name, preset=base,
                                **card_defaults(name, {**tuned, **overrides[name]}, args))
            except TTAError as exc:
                if explicit:
                    raise
                logger.info(f"[{name}] skipped: {exc}")
                continue
            configs[name] = adapter.config
            logger.info(f"[{name}]")
            try:
                if realtime is not None:  # the time unit: a forward of the source model, in this adapter's run
                    realtime = parse_realtime(args, source=load_model(args), adapter=name)
                results[name] = run_stream(adapter, stream, device=args.device, amp=args.amp, reset=reset, guard=guard,
                                           realtime=realtime, progress=args.progress, seed=seed, log=logger.info,
                                           trim_heap_every=args.trim_heap_every)
            except Exception as exc:  # noqa: BLE001 - one adapter's failure must not cost the others' results
                failed[name] = f"{type(exc).__name__}: {exc}"
                logger.error(f"[{name}] failed: {failed[name]}", exc_info=out is not None and not isinstance(exc, TTAError))
                continue
            if out is not None:  # written as soon as each adapter finishes
                write_results(results, out, title=title, meta={**meta(args, spec, seed, preset, configs),
                                                               "failed": failed})
        if not results and not failed:
            raise ConfigError("no adapter could be built on this model")
        if results:
            logger.info("")
            logger.info(format_table(results))
        if out is not None:
            written = write_results(results, out, title=title, meta={**meta(args, spec, seed, preset, configs),
                                                                     "failed": failed})
            logger.info("wrote " + ", ".join(str(p) for p in written.values()))
        if failed:
            logger.error(f"{len(failed)} of {len(failed) + len(results)} adapters failed: "
                         + "; ".join(f"{k} ({v})" for k, v in failed.items()))
            return 1
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="benchmark adapters on one stream", description=__doc__)
    parser.add_argument("--adapters", default="all", help="comma-separated adapter names or 'all' (default)")
    add_common_arguments(parser)
    parser.set_defaults(func=bench, out="results")
