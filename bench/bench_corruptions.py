"""Time to corrupt Fashion-MNIST (32x32 RGB) with the 15 corruptions, batched, vs per-image `imagecorruptions`.

    nice -n 10 .venv/bin/python bench/bench_corruptions.py [--n 10000] [--ref-n 200] [--severity 5] [--json out.json]

Columns per corruption:
- batched_s: `tta.streams.corruptions.corrupt` on all n images in chunks of 1000 (as `tta make-c`).
- ours_img_s / ref_img_s: images per second of our batched call and of the per-image reference
  (`imagecorruptions.corrupt`, one call per image) on the same `ref_n` images, measured side by side.
  NOTE: `imagecorruptions` uses the ImageNet-C constants (larger kernels, e.g. motion blur radius
  10-20 vs 6-9, zoom factors up to 1.31), so the per-image reference does somewhat different work
  than the CIFAR-10-C constants; it is the maintained per-image implementation (the `imagecorruptions` package).
- speedup wall / CPU: ratio of the reference's to our time on the same images (wall clock, and CPU
  time of the process: the machine is shared, CPU time is the steadier measure of work).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

from tta.streams.corruptions import STANDARD_ORDER, corrupt
from tta.streams.fashion_mnist import load_fashion_mnist

CHUNK = 1000


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads)."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--ref-n", type=int, default=200)
    ap.add_argument("--severity", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import imagecorruptions

    images, _ = load_fashion_mnist("test")
    images = images[: args.n]
    sample = images[: args.ref_n]
    rows = []
    corrupt(sample[:8], "frost", 1, seed=0)  # warm caches (frost textures, operators) outside the timing
    for name in STANDARD_ORDER:
        corrupt(sample[:8], name, args.severity, seed=0)
        imagecorruptions.corrupt(sample[0], severity=args.severity, corruption_name=name)  # numba JIT warm-up
        batched, batched_cpu = timed(lambda: [corrupt(images[k : k + CHUNK], name, args.severity, seed=k) for k in range(0, len(images), CHUNK)])
        ours, ours_cpu = timed(lambda: corrupt(sample, name, args.severity, seed=0))
        np.random.seed(0)
        ref, ref_cpu = timed(lambda: [imagecorruptions.corrupt(im, severity=args.severity, corruption_name=name) for im in sample])
        rows.append(
            {"corruption": name, "batched_s": batched, "batched_cpu_s": batched_cpu, "ours_img_s": len(sample) / ours,
             "ref_img_s": len(sample) / ref, "speedup_wall": ref / ours, "speedup_cpu": ref_cpu / ours_cpu}
        )
        print(f"{name:18s} batched {batched:7.2f} s ({batched_cpu:6.2f} CPU-s)   ours {len(sample) / ours:9.0f} img/s   "
              f"ref {len(sample) / ref:8.0f} img/s   x{ref / ours:6.1f} wall  x{ref_cpu / ours_cpu:6.1f} CPU", flush=True)
    total = sum(r["batched_s"] for r in rows)
    total_cpu = sum(r["batched_cpu_s"] for r in rows)
    ref_total = sum(len(images) / r["ref_img_s"] for r in rows)
    print(f"\nfull set: 15 x {len(images)} images at severity {args.severity}: {total:.1f} s wall, {total_cpu:.1f} CPU-s "
          f"batched; per-image reference would take ~{ref_total:.0f} s wall (extrapolated from {len(sample)} images "
          f"per corruption); overall x{ref_total / total:.1f}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, numpy {np.__version__}")
    print("\n| corruption | batched 10k wall (s) | CPU-s | ours img/s | imagecorruptions img/s | speedup wall | speedup CPU |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['corruption']} | {r['batched_s']:.2f} | {r['batched_cpu_s']:.2f} | {r['ours_img_s']:.0f} | "
              f"{r['ref_img_s']:.0f} | {r['speedup_wall']:.1f}x | {r['speedup_cpu']:.1f}x |")
    print(f"| **total** | {total:.1f} | {total_cpu:.1f} | | | {ref_total / total:.1f}x | |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": len(images), "severity": args.severity, "rows": rows, "total_s": total,
                       "ref_total_s_extrapolated": ref_total}, f, indent=1)


if __name__ == "__main__":
    main()
