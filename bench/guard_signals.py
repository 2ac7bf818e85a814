"""The collapse guard's drift signal against the true error gap, batch by batch (how its defaults were set).

Runs an adapter over a long stream and, on *every* batch, the guard's reference model (the source
weights with test-batch statistics: BN) beside it, recording with the labels: the error of both,
and the label-free signals the guard pools: the share of the reference's confident predictions
(max-softmax >= 0.8 / 0.9 / 0.95) that the adapted model contradicts, how often those confident
reference predictions are themselves wrong (the signal assumes rarely), agreement, prediction
entropy, class diversity. `--report` prints them per window of `--window` batches: the gap
(adapted - reference error, points) next to the signals.

    nice -n 10 python bench/guard_signals.py --adapter tent --out runs/guard-signals/tent.npy
    python bench/guard_signals.py --out runs/guard-signals/tent.npy --report --window 50

The array is saved every 100 batches, so a long run can be stopped and reported on.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

THRESHOLDS = (0.8, 0.9, 0.95)
# columns: n, wrong adapted, wrong reference, disagreements, entropy adapted, entropy reference,
# then per threshold: reliable, contradicted, reference wrong among reliable; then the two class histograms
N, WRONG_AD, WRONG_REF, DISAGREE, ENT_AD, ENT_REF, PER_T = 0, 1, 2, 3, 4, 5, 6


def record(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    import tta
    from tta.adapters import get_adapter_class
    from tta.cli.run import card_defaults
    from tta.engine.guard import _normalised_entropy, reference_model
    from tta.engine.prefetch import Prefetcher

    spec = tta.streams.load_spec(args.stream).with_overrides(args.stream_set)
    stream = spec.build(n_per_domain=args.limit)
    card = args.model or tta.models.DEFAULT_CARD
    overrides = get_adapter_class(args.adapter).Config.parse_assignments(args.assignments)
    torch.manual_seed(spec.seed)
    adapter = tta.adapt(tta.models.load(card), args.adapter, preset=spec.preset,
                        **card_defaults(args.adapter, overrides, argparse.Namespace(model=card)))
    reference = reference_model(adapter, "auto")
    rows: list[list[float]] = []
    t0 = time.perf_counter()
    with Prefetcher(stream, 2) as batches:
        for k, b in enumerate(batches):
            if args.max_batches and k >= args.max_batches:
                break
            out = adapter(b.x)
            with torch.no_grad():
                p = out.float() if adapter.output_kind == "probs" else out.float().softmax(1)
                r = reference(b.x).float().softmax(1)
            pa, pr = p.argmax(1), r.argmax(1)
            conf = r.max(1).values
            c = p.shape[1]
            row = [len(b), int((pa != b.y).sum()), int((pr != b.y).sum()), int((pa != pr).sum()),
                   float(_normalised_entropy(p).mean()), float(_normalised_entropy(r).mean())]
            for t in THRESHOLDS:
                reliable = conf >= t
                row += [int(reliable.sum()), int((reliable & (pa != pr)).sum()), int((reliable & (pr != b.y)).sum())]
            row += torch.bincount(pa, minlength=c).tolist() + torch.bincount(pr, minlength=c).tolist()
            rows.append(row)
            if k % 100 == 0:
                np.save(args.out, np.array(rows, dtype=np.float64))
                print(f"batch {k}, {time.perf_counter() - t0:.0f} s", flush=True)
    np.save(args.out, np.array(rows, dtype=np.float64))
    return 0


def _diversity(hist: np.ndarray) -> float:
    p = hist / hist.sum()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum() / np.log(len(hist)))


def report(path: str, window: int) -> str:
    a = np.load(path)
    c = (a.shape[1] - PER_T - 3 * len(THRESHOLDS)) // 2
    hist0 = PER_T + 3 * len(THRESHOLDS)
    lines = [f"{path}: {len(a)} batches, {int(a[:, N].sum()):,} images; windows of {window} batches",
             "| batches | adapted error | reference error | gap | contradicted (conf >= 0.8 / 0.9 / 0.95) "
             "| reference wrong when confident (0.9) | agreement | entropy ratio | diversity ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in range(0, len(a), window):
        b = a[s : s + window]
        n = b[:, N].sum()
        contra = [b[:, PER_T + 3 * i + 1].sum() / max(1.0, b[:, PER_T + 3 * i].sum()) for i in range(len(THRESHOLDS))]
        t = PER_T + 3 * THRESHOLDS.index(0.9)  # the guard's default `confident`: its reliable set
        ref_wrong = b[:, t + 2].sum() / max(1.0, b[:, t].sum())
        div = _diversity(b[:, hist0 : hist0 + c].sum(0)) / _diversity(b[:, hist0 + c : hist0 + 2 * c].sum(0))
        lines.append(
            f"| {s}-{s + len(b) - 1} | {100 * b[:, WRONG_AD].sum() / n:.2f} | {100 * b[:, WRONG_REF].sum() / n:.2f} | "
            f"{100 * (b[:, WRONG_AD].sum() - b[:, WRONG_REF].sum()) / n:+.2f} | "
            + " / ".join(f"{100 * x:.1f}%" for x in contra)
            + f" | {100 * ref_wrong:.1f}% | {1 - b[:, DISAGREE].sum() / n:.3f} | {b[:, ENT_AD].mean() / b[:, ENT_REF].mean():.2f} | {div:.3f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", default="tent")
    p.add_argument("--stream", default="fmnist-c-recurring")
    p.add_argument("--stream-set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--max-batches", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, help=".npy file of per-batch records")
    p.add_argument("--report", action="store_true")
    p.add_argument("--window", type=int, default=50, help="batches per row of the report")
    args = p.parse_args()
    if not args.report:
        record(args)
    print(report(args.out, args.window))
    return 0


if __name__ == "__main__":
    sys.exit(main())
