"""How hard is Fashion-MNIST-C for the source model? Clean error, per-corruption error (source and
BN adapt) per severity, to check that the default stream is neither barely degraded nor destroyed.

    nice -n 10 .venv/bin/python bench/fmnist_c_difficulty.py [--card resnet20-fmnist] [--severities 5]
        [--n 10000] [--batch 200] [--data-dir data/fashion-mnist-c] [--json out.json]

Source = the frozen model in eval mode; BN = test-batch statistics (`tta.adapt(model, "bn")`, stateless
per batch, so continual and reset-each-shift give the same numbers), batch 200, file order.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import tta
from tta.engine import run_stream
from tta.models import DEFAULT_CARD, load
from tta.streams import STANDARD_ORDER, CorruptionArraySet, load_fashion_mnist
from tta.streams.datasets import ArrayDomain
from tta.streams.settings import ContinualStream
from tta.streams.specs import data_root


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--card", default=DEFAULT_CARD)
    ap.add_argument("--severities", default="5", help="comma list, e.g. 1,2,3,4,5")
    ap.add_argument("--n", type=int, default=10000, help="images per domain")
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--adapters", default="source,bn")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = CorruptionArraySet(args.data_dir or data_root() / "fashion-mnist-c")
    severities = [int(s) for s in args.severities.split(",")]
    adapters = args.adapters.split(",")
    x, y = load_fashion_mnist("test")
    clean = ContinualStream([("clean", ArrayDomain(x[: args.n], y[: args.n]))], args.batch, order="file")
    results: dict = {"card": args.card, "n": args.n, "batch": args.batch, "clean": {}, "errors": {}}
    t0 = time.perf_counter()
    for name in adapters:
        model = load(args.card)
        res = run_stream(tta.adapt(model, name), clean, device="cpu", progress=False, log=lambda s: None)
        results["clean"][name] = res.domain_errors["clean"]
        for sev in severities:
            domains = [(c, data.domain(c, sev)) for c in STANDARD_ORDER]
            stream = ContinualStream(domains, args.batch, n_per_domain=args.n, order="file")
            res = run_stream(tta.adapt(load(args.card), name), stream, device="cpu", progress=False, log=lambda s: None)
            results["errors"][f"{name}@{sev}"] = res.domain_errors
            print(f"{name} severity {sev}: mean {np.mean(list(res.domain_errors.values())):.1f}%  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"\ncard {args.card}, {args.n} images per domain, batch {args.batch}")
    print("clean error: " + ", ".join(f"{k} {v:.1f}%" for k, v in results["clean"].items()))
    cols = list(results["errors"])
    print("\n| corruption | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for c in STANDARD_ORDER:
        print(f"| {c} | " + " | ".join(f"{results['errors'][k][c]:.1f}" for k in cols) + " |")
    print("| **mean** | " + " | ".join(f"**{np.mean(list(results['errors'][k].values())):.1f}**" for k in cols) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
