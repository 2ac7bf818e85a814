"""Per-domain selection statistics of the sample-selecting adapters (EATA/ETA, SAR, DeYO, ROID).

Runs each adapter over a stream exactly as `tta bench` does (same spec, preset, seed, model card,
card artefacts) and prints, per domain, the error and the share of the domain's images that entered
the adaptation loss (``counters["selected"]``: ETA/EATA after both filters, DeYO after the PLPD
filter, ROID the samples kept by the diversity weighting; SAR: ``counters["reliable"]``, the first
filter) and SAR's model recoveries. The errors equal the `tta bench` table's for the same arguments.

    nice -n 10 python bench/selection_stats.py --adapters sar,eta,deyo,roid --limit 2000
    nice -n 10 python bench/selection_stats.py --model vit-fmnist --adapters roid --set prior_on=probs
"""

from __future__ import annotations

import argparse
import sys

import torch

import tta
from tta.engine import seed_everything

KEYS = ("selected", "reliable", "recoveries", "skipped_nonfinite_loss")


def run(name: str, card: str, stream_name: str, limit: int | None, assignments: list[str], device: str) -> None:
    from tta.adapters import get_adapter_class

    spec = tta.streams.load_spec(stream_name)
    seed = int(spec.seed or 0)
    stream = spec.build(n_per_domain=limit, seed=seed)
    overrides = get_adapter_class(name).Config.parse_assignments(assignments)
    if "fisher" in get_adapter_class(name).Config.field_names():
        overrides.setdefault("fisher", card)
    seed_everything(seed)
    adapter = tta.adapt(tta.models.load(card), name, preset=spec.preset, **overrides).to(device)
    rows: dict[str, dict[str, float]] = {}
    before = dict(adapter.counters)
    for batch in stream:
        out = adapter(batch.x.to(device))
        row = rows.setdefault(batch.domain, {"images": 0, "wrong": 0})
        row["images"] += batch.x.shape[0]
        row["wrong"] += int((out.argmax(1).cpu() != batch.y).sum())
        for key in KEYS:
            row[key] = row.get(key, 0) + adapter.counters.get(key, 0) - before.get(key, 0)
        before = dict(adapter.counters)
    shown = [k for k in KEYS if any(r[k] for r in rows.values())]
    print(f"{name} on {card}, {stream_name}, {limit or 'all'} images per domain, preset {spec.preset}, "
          f"{' '.join(assignments) or 'defaults'}")
    print(f"{'domain':<18} {'error %':>8} " + " ".join(f"{k + (' %' if k != 'recoveries' else ''):>12}" for k in shown))
    for domain, r in rows.items():
        cells = [f"{r[k]:>12d}" if k == "recoveries" else f"{100 * r[k] / r['images']:>12.1f}" for k in shown]
        print(f"{domain:<18} {100 * r['wrong'] / r['images']:>8.2f} " + " ".join(cells))
    total = sum(r["images"] for r in rows.values())
    mean = sum(100 * r["wrong"] / r["images"] for r in rows.values()) / len(rows)
    cells = [f"{sum(r[k] for r in rows.values()):>12d}" if k == "recoveries"
             else f"{100 * sum(r[k] for r in rows.values()) / total:>12.1f}" for k in shown]
    print(f"{'mean / all':<18} {mean:>8.2f} " + " ".join(cells))
    print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", default="eta,sar,deyo,roid", help="comma-separated adapter names")
    parser.add_argument("--model", default=None, help="model card (default: the default card)")
    parser.add_argument("--stream", default=None, help="stream spec (default: the default spec)")
    parser.add_argument("--limit", type=int, default=2000, help="images per domain (0: all)")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    card = args.model or tta.models.DEFAULT_CARD
    for name in [n.strip() for n in args.adapters.split(",") if n.strip()]:
        run(name, card, args.stream or tta.streams.DEFAULT_SPEC, args.limit or None, args.assignments, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
