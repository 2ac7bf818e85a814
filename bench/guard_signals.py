"""The collapse guard's drift signal against the true error gap, batch by batch (how its defaults were set).

Runs an adapter over a long stream and, on *every* batch, the guard's reference model (the source
weights with test-batch statistics: BN) beside it, recording with the labels: the error of both,
and the label-free signals the guard pools: the share of the reference's confident predictions
(max-softmax >= 0.8 / 0.9 / 0.95) that the adapted model contradicts, how often those confident
reference predictions are themselves wrong (the signal assumes rarely), agreement, prediction
entropy, class diversity. `--report` prints them per window of `--window` batches: the gap
(adapted - reference error, points) next to the signals. It also records candidate signals that might
tell an adapter which corrects the reference's confident mistakes from one which decays (see `COLUMNS`),
with the share of contradictions the adapted model gets right, which is what they should track.

    nice -n 10 python bench/guard_signals.py --adapter tent --out runs/guard-signals/tent.npy
    python bench/guard_signals.py --out runs/guard-signals/tent.npy --report --window 50

The array is saved every 100 batches, so a long run can be stopped and reported on.

`--rule` replays guard decision rules (`GuardConfig` settings) on a record: up to a rule's first
action the guarded run sees the unguarded run's predictions, so the record says when each rule would
first act, on what signal values and at what true gap (an adapter that improves on the reference
should draw no action; a decaying one should draw it early):

    python bench/guard_signals.py --out runs/guard-signals/tent.npy --rule probe_every=4,window=8 \
        --rule probe_every=1,window=4 --rule probe_every=1,window=4,diversity_window=32
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

THRESHOLDS = (0.8, 0.9, 0.95)
#: the guard's default `confident` (`GuardConfig.confident`): its reliable set, and the one the candidate
#: signals and the report's single-threshold columns use
CONFIDENT = 0.9
assert CONFIDENT in THRESHOLDS
#: per-batch columns, then per threshold (reliable, contradicted, reference wrong among reliable), then the
#: two class histograms (adapted, reference). The candidate columns are for `CONFIDENT`, each a way to tell an adapter that corrects the reference from one that decays:
#: - stable: reliable predictions the reference also makes, as confidently, on the horizontally flipped
#:   image (a reference answer that survives an augmentation is more often right);
#: - sure: contradictions where the adapted model is itself confident (max-softmax >= CONFIDENT);
#: - second: contradictions where the adapted model picks the reference's second choice;
#: - right: contradictions the adapted model gets right (labels: what the candidates should track).
COLUMNS = ("n", "wrong_adapted", "wrong_reference", "disagree", "entropy_adapted", "entropy_reference",
           "stable", "stable_contradicted", "stable_reference_wrong", "sure", "second", "right",
           *(f"{name}@{t}" for t in THRESHOLDS for name in ("reliable", "contradicted", "reference_wrong")))
COL = {name: i for i, name in enumerate(COLUMNS)}


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
                r_flip = reference(b.x.flip(-1)).float().softmax(1)
            pa, pr = p.argmax(1), r.argmax(1)
            conf = r.max(1).values
            c = p.shape[1]
            disagree = pa != pr
            contra = (conf >= CONFIDENT) & disagree
            stable = (conf >= CONFIDENT) & (r_flip.max(1).values >= CONFIDENT) & (r_flip.argmax(1) == pr)
            row = [len(b), int((pa != b.y).sum()), int((pr != b.y).sum()), int(disagree.sum()),
                   float(_normalised_entropy(p).mean()), float(_normalised_entropy(r).mean()),
                   int(stable.sum()), int((stable & disagree).sum()), int((stable & (pr != b.y)).sum()),
                   int((contra & (p.max(1).values >= CONFIDENT)).sum()),
                   int((contra & (pa == r.topk(2, 1).indices[:, 1])).sum()), int((contra & (pa == b.y)).sum())]
            for t in THRESHOLDS:
                reliable = conf >= t
                row += [int(reliable.sum()), int((reliable & disagree).sum()), int((reliable & (pr != b.y)).sum())]
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


def _pct(x: float, of: float) -> float:
    return 100 * x / max(1.0, of)


def load_record(path: str) -> tuple[np.ndarray, int]:
    """A record written by `record` (per-batch rows) and its number of classes; a clear exit otherwise."""
    try:
        a = np.load(path)
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path}: cannot read a record ({e})") from e
    if a.ndim != 2 or a.shape[1] < len(COLUMNS) + 2 or (a.shape[1] - len(COLUMNS)) % 2:
        raise SystemExit(f"{path}: shape {a.shape}; not a record of this version of the script")
    return a, (a.shape[1] - len(COLUMNS)) // 2


def report(path: str, window: int) -> str:
    a, c = load_record(path)
    hist0 = len(COLUMNS)
    lines = [f"{path}: {len(a)} batches, {int(a[:, COL['n']].sum()):,} images; windows of {window} batches",
             "| batches | adapted error | reference error | gap | contradicted (conf >= 0.8 / 0.9 / 0.95) "
             f"| reference wrong when confident ({CONFIDENT}) | contradictions right | stable: contradicted, reference wrong "
             "| sure contradictions | second choice | agreement | entropy ratio | diversity ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in range(0, len(a), window):
        b = a[s : s + window].sum(0)
        ent = a[s : s + window, [COL["entropy_adapted"], COL["entropy_reference"]]].mean(0)
        n = b[COL["n"]]
        contra = [_pct(b[COL[f"contradicted@{t}"]], b[COL[f"reliable@{t}"]]) for t in THRESHOLDS]
        reliable, contradicted = b[COL[f"reliable@{CONFIDENT}"]], b[COL[f"contradicted@{CONFIDENT}"]]
        div = _diversity(b[hist0 : hist0 + c]) / _diversity(b[hist0 + c : hist0 + 2 * c])
        lines.append(
            f"| {s}-{s + len(a[s : s + window]) - 1} | {_pct(b[COL['wrong_adapted']], n):.2f} "
            f"| {_pct(b[COL['wrong_reference']], n):.2f} "
            f"| {_pct(b[COL['wrong_adapted']] - b[COL['wrong_reference']], n):+.2f} | "
            + " / ".join(f"{x:.1f}%" for x in contra)
            + f" | {_pct(b[COL[f'reference_wrong@{CONFIDENT}']], reliable):.1f}% | {_pct(b[COL['right']], contradicted):.0f}% "
            f"| {_pct(b[COL['stable_contradicted']], b[COL['stable']]):.2f}%, "
            f"{_pct(b[COL['stable_reference_wrong']], b[COL['stable']]):.1f}% "
            f"| {_pct(b[COL['sure']], reliable):.2f}% | {_pct(b[COL['second']], contradicted):.0f}% "
            f"| {1 - b[COL['disagree']] / n:.3f} | {ent[0] / ent[1]:.2f} | {div:.3f} |")
    return "\n".join(lines)


def replay(path: str, settings: str) -> dict:
    """When the guard rule `settings` ("key=value,key=value" on `GuardConfig`'s defaults) would first
    act on the recorded run: its drift and collapse decisions, pooled as `CollapseGuard` pools them
    (the contradictions and the collapse signals over the last `window` probes, the narrowing over the
    last `diversity_window`), up to the first one (after an action the run is no longer the record's).
    When the first batch (the starting state) contradicts the reference, a drift decision before the
    first healthy one only stands the guard down (`max_futile_resets` > 0): the run goes on as
    recorded, and so does the replay.
    The entropy-floor collapse test is left out (it needs every batch's entropy, not the probes')."""
    from tta.engine.guard import GuardConfig

    cfg = GuardConfig.parse([item for item in settings.split(",") if item])
    if cfg.confident != CONFIDENT:
        raise SystemExit(f"records hold contradictions at confidence {CONFIDENT} only, not {cfg.confident}")
    a, c = load_record(path)
    hist, ref_hist = a[:, len(COLUMNS) : len(COLUMNS) + c], a[:, len(COLUMNS) + c :]
    probes = np.arange(0, len(a), cfg.probe_every)

    def diversity_ratio(batches: np.ndarray) -> float:  # as the guard's: 1 when the reference's is 0
        ref = _diversity(ref_hist[batches].sum(0))
        return _diversity(hist[batches].sum(0)) / ref if ref > 0 else 1.0

    first = a[0]  # the adapter's starting state, as the guard's first probe judges it
    healthy_seen = first[COL[f"contradicted@{CONFIDENT}"]] <= cfg.max_disagreement * first[COL[f"reliable@{CONFIDENT}"]]
    for i in range(cfg.window - 1, len(probes)):
        decisions = i + 2 - cfg.window
        short = probes[i + 1 - cfg.window : i + 1]
        long = probes[max(0, i + 1 - (cfg.diversity_window or cfg.window)) : i + 1]
        reliable = a[short, COL[f"reliable@{CONFIDENT}"]].sum()
        disagreement = a[short, COL[f"contradicted@{CONFIDENT}"]].sum() / reliable if reliable else 0.0
        ratio, narrowing = diversity_ratio(short), diversity_ratio(long)
        collapse = ratio < cfg.min_diversity_ratio
        contradicting = disagreement > cfg.max_disagreement
        drift = contradicting and (cfg.drift_diversity_ratio is None or narrowing < cfg.drift_diversity_ratio)
        healthy_seen = healthy_seen or not (collapse or contradicting)
        if drift and not collapse and not healthy_seen and cfg.max_futile_resets > 0:
            continue  # a stand-down: the adapter is left as it is
        if collapse or drift:
            k = int(probes[i])
            before = a[max(0, k - 24) : k + 1].sum(0)
            return {"rule": settings, "decisions": decisions, "batch": k, "reason": "collapse" if collapse else "drift",
                    "disagreement": disagreement, "diversity_ratio": ratio, "narrowing": narrowing,
                    "gap": _pct(before[COL["wrong_adapted"]] - before[COL["wrong_reference"]], before[COL["n"]])}
    return {"rule": settings, "decisions": max(0, len(probes) + 1 - cfg.window), "batch": None}


def replay_report(path: str, rules: list[str]) -> str:
    lines = [f"{path}: first action of each rule (gap: adapted - reference error over the 25 batches up to it)",
             "| rule | decisions | first action | disagreement | diversity ratio (decision / narrowing) | gap |",
             "|---|---|---|---|---|---|"]
    for rule in rules:
        r = replay(path, rule)
        if r["batch"] is None:
            lines.append(f"| {rule} | {r['decisions']} | none | | | |")
        else:
            lines.append(f"| {rule} | {r['decisions']} | batch {r['batch']} ({r['reason']}) | {100 * r['disagreement']:.2f}% "
                         f"| {r['diversity_ratio']:.3f} / {r['narrowing']:.3f} | {r['gap']:+.2f} |")
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
    p.add_argument("--rule", action="append", default=[], metavar="KEY=VALUE,...",
                   help="replay a guard rule (GuardConfig settings) on the record: when it would first act")
    args = p.parse_args()
    if args.rule:
        print(replay_report(args.out, args.rule))
        return 0
    if not args.report:
        record(args)
    print(report(args.out, args.window))
    return 0


if __name__ == "__main__":
    sys.exit(main())
