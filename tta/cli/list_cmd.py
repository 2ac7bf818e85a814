"""`tta list`: adapters, model cards and stream specs, and where each was found (torch-free).

Cards and specs are searched in the order of `tta.paths` ($TTA_MODELS_DIR / $TTA_STREAMS_DIR, the
working directory's models/ and streams/, the per-user folders, the files shipped with the package);
built-in adapters are read from their source and plugin adapters from the installed entry points,
without importing either. Exits 1 with a hint when no card or no spec is found.
"""

from __future__ import annotations

import argparse
import sys

from tta.errors import TTAError


def _aligned(rows: list[tuple[str, str]]) -> list[str]:
    width = max((len(a) for a, _ in rows), default=0)
    return [f"  {a.ljust(width)}  {b}".rstrip() for a, b in rows]


def adapter_lines() -> list[str]:
    from tta.plugins import adapter_catalog

    return _aligned([(e.name, e.summary if e.origin == "built-in" else f"[{e.origin}]")
                     for e in adapter_catalog()])


def card_lines() -> list[str]:
    from tta.models.cards import DEFAULT_CARD, card_entries, get_card

    rows: list[tuple[str, str]] = []
    for name, found in card_entries().items():
        try:
            card = get_card(found.path)
        except TTAError as exc:
            rows.append((name, f"(unreadable: {exc}) [{found.origin}: {found.path}]"))
            continue
        acc = f", clean accuracy {card.clean_accuracy:.2f}%" if card.clean_accuracy is not None else ""
        default = " [default]" if name == DEFAULT_CARD else ""
        rows.append((name + default, f"{card.arch}, {card.num_classes} classes, input {list(card.input_size)}{acc} "
                                     f"[{found.origin}: {found.path}]"))
    return _aligned(rows)


def spec_lines() -> list[str]:
    from tta.streams.specs import DEFAULT_SPEC, load_spec, spec_entries

    rows: list[tuple[str, str]] = []
    for name, found in spec_entries().items():
        try:
            spec = load_spec(found.path)
        except TTAError as exc:
            rows.append((name, f"(unreadable: {exc}) [{found.origin}: {found.path}]"))
            continue
        default = " [default]" if name == DEFAULT_SPEC else ""
        about = f", {spec.description}" if spec.description else ""
        rows.append((name + default, f"{spec.dataset}, {spec.setting}{about} [{found.origin}: {found.path}]"))
    return _aligned(rows)


def list_all(args: argparse.Namespace) -> int:
    from tta import paths

    sections = {"adapters": adapter_lines, "models": card_lines, "streams": spec_lines}
    chosen = [args.what] if args.what else list(sections)
    empty = []
    for i, what in enumerate(chosen):
        lines = sections[what]()
        print(f"{what}:" if i == 0 else f"\n{what}:")
        print("\n".join(lines) if lines else "  (none)")
        if not lines:
            empty.append(what)
    for what in empty:
        kind = "model cards" if what == "models" else "stream specs" if what == "streams" else "adapters"
        where = paths.describe_search(what) if what in paths.KINDS else "the tta.adapters package"
        print(f"tta list: no {kind} found; looked in {where}. The installed package is incomplete "
              f"(reinstall tta-runtime) or point ${paths.ENV_VARS.get(what, 'TTA_MODELS_DIR')} at a folder of them",
              file=sys.stderr)
    return 1 if empty else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("list", help="list adapters, model cards and stream specs", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", choices=("adapters", "models", "streams"), help="one section only")
    parser.set_defaults(func=list_all)
