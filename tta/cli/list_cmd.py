"""`tta list`: registered adapters, model cards and stream specs."""

from __future__ import annotations

import argparse

from tta.errors import TTAError


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if (doc or "").strip() else ""


def adapter_lines() -> list[str]:
    from tta.adapters import get_adapter_class, list_adapters

    return _aligned([(n, _first_line(get_adapter_class(n).__doc__)) for n in list_adapters()])


def _aligned(rows: list[tuple[str, str]]) -> list[str]:
    width = max((len(a) for a, _ in rows), default=0)
    return [f"  {a.ljust(width)}  {b}" for a, b in rows]


def card_lines() -> list[str]:
    import tta.models as models

    rows: list[tuple[str, str]] = []
    for name in models.list_cards():
        try:
            card = models.get_card(name)
        except TTAError as exc:
            rows.append((name, f"(unreadable: {exc})"))
            continue
        acc = f", clean accuracy {card.clean_accuracy:.2f}%" if card.clean_accuracy is not None else ""
        default = " [default]" if name == models.DEFAULT_CARD else ""
        rows.append((name + default, f"{card.arch}, {card.num_classes} classes, input {list(card.input_size)}{acc}"))
    return _aligned(rows)


def spec_lines() -> list[str]:
    import tta.streams as streams

    rows: list[tuple[str, str]] = []
    for name in streams.list_specs():
        try:
            spec = streams.load_spec(name)
        except TTAError as exc:
            rows.append((name, f"(unreadable: {exc})"))
            continue
        default = " [default]" if name == streams.DEFAULT_SPEC else ""
        about = getattr(spec, "description", "") or ""
        rows.append((name + default, f"{spec.dataset}, {spec.setting}{', ' + about if about else ''}"))
    return _aligned(rows)


def list_all(args: argparse.Namespace) -> int:
    sections = {"adapters": adapter_lines, "models": card_lines, "streams": spec_lines}
    chosen = [args.what] if args.what else list(sections)
    for i, what in enumerate(chosen):
        lines = sections[what]()
        print(f"{what}:" if i == 0 else f"\n{what}:")
        print("\n".join(lines) if lines else "  (none)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("list", help="list adapters, model cards and stream specs", description=__doc__)
    parser.add_argument("what", nargs="?", choices=("adapters", "models", "streams"), help="one section only")
    parser.set_defaults(func=list_all)
