"""Long-stream soak: windowed error per adapter, unguarded / under the collapse guard / with RDumb's
periodic reset, plus resident memory, throughput per window and NaN outputs of every run.

Every (adapter, variant) runs in its own child process (a fresh interpreter: its resident memory is
its own) one after the other, and writes ``<out>/<adapter>.<variant>.json``; finished runs are not
repeated, so an interrupted soak resumes. `--report` (or the end of a run) reads every JSON in
``<out>`` and prints the tables of BENCHMARKS.md ("Long streams"):

- windowed error: per window of `--window` images, the error of each adapter and variant, and
  against BN's error on the same window (the same images: every run sees the same stream);
- the acceptance check per gradient-based adapter: the worst window of the guarded run minus BN's
  error on that window (target <= 1 point; the source model replaces BN for models without
  BatchNorm), and the guarded mean against the unguarded mean (target: not higher);
- soak: RSS at the start (model and stream built, before the first batch), after the first window
  (warm-up) and at the end, images/s of the first and last windows, batches with NaN/Inf outputs.

    nice -n 10 python bench/long_streams.py --stream fmnist-c-recurring --adapters source,bn,tent \\
        --variants plain,guard,reset --out runs/recurring            # 300,000 images per run
    python bench/long_streams.py --out runs/recurring --report      # tables only
    python bench/long_streams.py --stream fmnist-ccc-medium --stream-set length=300000 ...
    python bench/long_streams.py --device cuda --jobs 4 --threads 4 --adapters cotta,vida,vdp ...  # a GPU machine

Variants: plain (the spec's policy, never reset), guard (default `GuardConfig` under the card's guard
settings, then --guard-set), reset (every `--reset-every` batches: RDumb's 1,000 steps by default).

Runs of different lengths in one ``--out`` (e.g. ``--stream-set recurrences=3`` beside 4) are compared
on their common full windows: a generated stream's batch k depends only on the seed and k, so the
shorter stream is the first part of the longer one, image for image.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

VARIANTS = ("plain", "guard", "reset")
#: adapters that train (the target concerns them); others are references
GRADIENT_FREE = {"source", "bn", "alpha-bn", "adanpc"}


def rss_mb() -> float:
    """Resident set size of this process (Linux /proc), MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssSampler:
    """RSS every `every` seconds in a background thread: (seconds since start, MiB) pairs."""

    def __init__(self, every: float = 1.0) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self.samples.append((time.perf_counter() - self._t0, rss_mb()))

    def stop(self) -> list[tuple[float, float]]:
        self._stop.set()
        self._thread.join()
        return self.samples


# ------------------------------------------------------------------------------------------------ child


def run_one(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    import tta
    from tta.adapters import adapt, get_adapter_class
    from tta.cli.run import card_defaults
    from tta.engine import GuardConfig, run_stream, seed_everything
    from tta.engine.guard import declared_guard

    spec = tta.streams.load_spec(args.stream).with_overrides(args.stream_set)
    stream = spec.build(n_per_domain=args.limit)
    name, variant = args.adapter, args.variant
    mine = [a.split(".", 1)[1] for a in args.assignments if "." in a.split("=", 1)[0] and a.split(".", 1)[0] == name]
    overrides = get_adapter_class(name).Config.parse_assignments(mine)
    ns = argparse.Namespace(model=args.model)
    seed_everything(spec.seed)
    adapter = adapt(tta.models.load(args.model or tta.models.DEFAULT_CARD), name, preset=spec.preset,
                    **card_defaults(name, overrides, ns))
    guard = GuardConfig.parse(args.guard_set, base=declared_guard(adapter)) if variant == "guard" else None
    reset = args.reset_every if variant == "reset" else None
    rss_start = rss_mb()
    sampler = RssSampler()
    result = run_stream(adapter, stream, device=args.device, reset=reset, guard=guard, progress=False, seed=spec.seed,
                        log=lambda line: print(f"[{name}/{variant}] {line}", flush=True),
                        trim_heap_every=args.trim_heap_every)
    samples = sampler.stop()
    windows = result.windows(args.window)
    ends = [0.0]
    for w in windows:  # elapsed seconds at the end of each window (the trace's clock)
        ends.append(ends[-1] + w["images"] / w["images_per_s"])
    first_end = ends[1] if len(ends) > 1 else 0.0
    after_warmup = [m for t, m in samples if t >= first_end]
    out = {
        "adapter": name + (f"@{args.tag}" if args.tag else ""), "variant": variant, "stream": spec.name,
        "images": result.images, "commit": _commit(),
        "mean_error": result.mean_error, "stream_error": result.stream_error,
        "images_per_s": result.images_per_s, "seconds": result.seconds, "steps": result.steps,
        "resets": result.resets, "nonfinite_outputs": result.nonfinite_outputs,
        "skipped_nonfinite_loss": result.skipped_nonfinite_loss,
        "guard_events": result.guard_events, "guard": result.guard, "guard_seconds": result.guard_seconds,
        "heap_trims": result.heap_trims, "heap_trim_seconds": result.heap_trim_seconds,
        "trim_heap_every": args.trim_heap_every,
        "windows": windows,
        "rss_mb": {"start": rss_start, "after_first_window": after_warmup[0] if after_warmup else None,
                   "end": rss_mb(), "max": max([m for _, m in samples], default=rss_start)},
        "rss_samples": samples[:: max(1, len(samples) // 400)],
        "config": adapter.config.to_dict(), "threads": args.threads, "device": args.device, "window": args.window,
        "command": " ".join(sys.argv),
    }
    Path(args.json).write_text(json.dumps(out, indent=1, default=str) + "\n")
    return 0


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ------------------------------------------------------------------------------------------------ parent


def load_runs(out: Path) -> dict[tuple[str, str], dict[str, Any]]:
    runs = {}
    for path in sorted(out.glob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "windows" in data:
            runs[(data["adapter"], data["variant"])] = data
    return runs


def _errors(run: dict[str, Any]) -> list[float]:
    return [w["error"] for w in run["windows"]]


def _common(a: dict[str, Any], b: dict[str, Any]) -> int:
    """Windows two runs of one stream share: all when they are as long, else the full windows of the
    shorter (its last, shorter window is left out)."""
    wa, wb = a["windows"], b["windows"]
    if len(wa) == len(wb) and a["images"] == b["images"]:
        return len(wa)
    short = wa if a["images"] <= b["images"] else wb
    return sum(1 for w in short if w["images"] >= a["window"])


def _error_over(run: dict[str, Any], n: int) -> float:
    """Error (%) over the images of the first `n` windows."""
    ws = run["windows"][:n]
    return sum(w["error"] * w["images"] for w in ws) / max(1, sum(w["images"] for w in ws))


def report(out: Path, baseline: str | None = None) -> str:
    from tta.engine.guard import count_actions

    runs = load_runs(out)
    if not runs:
        return f"no runs in {out}"
    adapters = list(dict.fromkeys(a for a, _ in runs))
    base = baseline or ("bn" if ("bn", "plain") in runs else "source")
    ref = runs.get((base, "plain"))
    lines = []
    any_run = next(iter(runs.values()))
    window = any_run["window"]
    lines.append(f"stream {any_run['stream']}, {any_run['images']:,} images, windows of {window:,} images; "
                 f"comparator: {base}")
    lines.append("")
    lines.append("| adapter | variant | mean error | stream error | worst window - " + base +
                 " | windows > " + base + " + 1 | actions | img/s |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for a in adapters:
        for v in VARIANTS:
            run = runs.get((a, v))
            if run is None:
                continue
            gap = worst = over = "-"
            n = 0 if ref is None else _common(run, ref)
            if n:
                diffs = [e - b for e, b in zip(_errors(run)[:n], _errors(ref)[:n])]
                worst = f"{max(diffs):+.2f} (window {diffs.index(max(diffs)) + 1})"
                over = f"{sum(d > 1.0 for d in diffs)} / {len(diffs)}"
            counts = count_actions(run.get("guard_events", []))
            act = (f"{counts['rollback']} rb, {counts['reset']} rs"
                   + (f", {counts['stand_down']} stood down" if counts["stand_down"] else "")
                   if v == "guard" else (f"{run['resets']} resets" if v == "reset" else "-"))
            lines.append(f"| {a} | {v} | {run['mean_error']:.2f} | {run['stream_error']:.2f} | {worst} | {over} | "
                         f"{act} | {run['images_per_s']:.0f} |")
    lines.append("")
    # window table (error per window), one column per run
    cols = [(a, v) for a in adapters for v in VARIANTS if (a, v) in runs]
    lines.append("| window | " + " | ".join(f"{a} {v}" if v != "plain" else a for a, v in cols) + " |")
    lines.append("|---|" + "---|" * len(cols))
    n = max(len(runs[c]["windows"]) for c in cols)
    for i in range(n):
        cells = []
        for c in cols:
            w = runs[c]["windows"]
            cells.append(f"{w[i]['error']:.2f}" if i < len(w) else "")
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    lines.append("")
    # acceptance per gradient-based adapter
    lines.append("Target (guarded): no window more than 1 point above " + base + "; mean at or below the unguarded mean.")
    for a in adapters:
        if a.split("@")[0] in GRADIENT_FREE or (a, "guard") not in runs or ref is None:
            continue
        # a tagged guard run (e.g. tent@probe1: other guard settings) against its adapter's plain run
        g, p = runs[(a, "guard")], runs.get((a, "plain"), runs.get((a.split("@")[0], "plain")))
        n = _common(g, ref)
        diffs = [e - b for e, b in zip(_errors(g)[:n], _errors(ref)[:n])]
        ok_w = max(diffs) <= 1.0
        guarded, unguarded, span = g["mean_error"], None if p is None else p["mean_error"], ""
        if p is not None and g["images"] != p["images"]:  # different lengths: the error over the images both saw
            m = _common(g, p)
            guarded, unguarded, span = _error_over(g, m), _error_over(p, m), f" (first {m} windows)"
        if unguarded is None:
            mean = f"guarded mean {guarded:.2f}; no unguarded run in this folder to compare with"
        else:
            ok_m = guarded <= unguarded + 1e-9
            mean = f"guarded mean {guarded:.2f} vs unguarded {unguarded:.2f}{span} ({'met' if ok_m else 'MISSED'})"
        lines.append(f"- {a}: worst guarded window {max(diffs):+.2f} vs {base} over {n} windows "
                     f"({'met' if ok_w else 'MISSED'}); {mean}")
    lines.append("")
    # soak table
    lines.append("| adapter | variant | RSS start MiB | after window 1 | end | max | img/s first / last window | NaN batches |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for a, v in cols:
        r = runs[(a, v)]
        m = r["rss_mb"]
        w = r["windows"]
        aw = "-" if m["after_first_window"] is None else f"{m['after_first_window']:.0f}"
        lines.append(f"| {a} | {v} | {m['start']:.0f} | {aw} | {m['end']:.0f} | {m['max']:.0f} | "
                     f"{w[0]['images_per_s']:.0f} / {w[-1]['images_per_s']:.0f} | {r['nonfinite_outputs']} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stream", default="fmnist-c-recurring")
    p.add_argument("--stream-set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--limit", type=int, default=None, help="images per domain (recurring)")
    p.add_argument("--model", default=None)
    p.add_argument("--adapters", default="source,bn,alpha-bn,tent,adanpc")
    p.add_argument("--variants", default="plain,guard,reset")
    p.add_argument("--set", dest="assignments", action="append", default=[], metavar="ADAPTER.KEY=VALUE",
                   help="adapter config override, e.g. --set cotta.ap=card")
    p.add_argument("--guard-set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--reset-every", type=int, default=1000, help="batches between resets of the reset variant")
    p.add_argument("--window", type=int, default=10_000, help="images per window")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--trim-heap-every", type=int, default=100, metavar="N",
                   help="heap trims every N batches (tta.engine.heap; 0 = never, the behaviour before trimming)")
    p.add_argument("--device", default="cpu", help="device of the adapter (cpu, cuda); the stream is generated "
                   "on the CPU")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (child processes; e.g. several runs sharing "
                   "one GPU, each with --threads of the CPU cores)")
    p.add_argument("--out", required=True)
    p.add_argument("--report", action="store_true", help="only print the tables of the runs in --out")
    p.add_argument("--baseline", default=None, help="comparator adapter (default: bn, else source)")
    p.add_argument("--tag", default=None, help="label of these runs (adapter@tag), e.g. a config variant")
    # child mode
    p.add_argument("--adapter", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.json:
        return run_one(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    if not args.report:
        variants = [v for v in args.variants.split(",") if v]
        unknown = set(variants) - set(VARIANTS)
        if unknown:
            p.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
        running: list[tuple[str, subprocess.Popen, float]] = []

        def wait_for(slots: int) -> None:
            """Block until at most `slots` runs are still going, reporting the ones that ended."""
            while len(running) > slots:
                for item in list(running):
                    label, proc, t0 = item
                    if proc.poll() is not None:
                        running.remove(item)
                        print(f"== {label}: exit {proc.returncode}, {time.perf_counter() - t0:.0f} s", flush=True)
                time.sleep(0.5)

        for name in [a.strip() for a in args.adapters.split(",") if a.strip()]:
            for variant in variants:
                if name in GRADIENT_FREE and variant != "plain":
                    continue  # nothing to guard or reset
                label = name + (f"@{args.tag}" if args.tag else "")
                target = out / f"{label}.{variant}.json"
                if target.is_file():
                    print(f"{target} exists, skipped", flush=True)
                    continue
                cmd = [sys.executable, __file__, "--stream", args.stream, "--adapter", name, "--variant", variant,
                       "--json", str(target), "--window", str(args.window), "--threads", str(args.threads),
                       "--reset-every", str(args.reset_every), "--device", args.device, "--out", str(out),
                       "--trim-heap-every", str(args.trim_heap_every)]
                for flag, values in (("--stream-set", args.stream_set), ("--set", args.assignments),
                                     ("--guard-set", args.guard_set)):
                    for v in values:
                        cmd += [flag, v]
                if args.limit is not None:
                    cmd += ["--limit", str(args.limit)]
                if args.model:
                    cmd += ["--model", args.model]
                if args.tag:
                    cmd += ["--tag", args.tag]
                wait_for(args.jobs - 1)
                print(f"== {name} / {variant}", flush=True)
                running.append((f"{name} / {variant}", subprocess.Popen(cmd), time.perf_counter()))
        wait_for(0)
    print(report(out, args.baseline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
