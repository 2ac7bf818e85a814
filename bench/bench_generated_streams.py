"""Generated long streams: corruption throughput against adapter throughput, and what prefetch hides.

A generated stream (`tta.streams.generated`) corrupts every batch when it is drawn, so its cost is
paid per batch. This measures, in one process and on the same batches:

1. generation alone: images/s of drawing batches of `fmnist-c-recurring` (one corruption per image)
   and `fmnist-ccc-medium` (two per image), one thread;
2. adaptation alone: images/s of each adapter's predict-and-adapt on pre-generated batches;
3. `run_stream` over the generated stream with the background prefetch off (0) and on (2): with it
   on, generation runs beside adaptation and the run's throughput approaches (2).

    nice -n 10 python bench/bench_generated_streams.py --adapters source,bn,tent --batches 20
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", default="source,bn,tent")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--start", type=int, default=0, help="first batch of each stream (any batch regenerates alone)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import tta
    from tta.engine import run_stream
    from tta.errors import TTAError
    from tta.streams.base import Stream

    class Slice(Stream):
        """Batches start .. start + n of a generated stream."""

        def __init__(self, stream, start: int, n: int) -> None:
            self.stream, self.start, self.n = stream, start, n
            self.domains, self.domain_sizes, self.reset = [], {}, "never"

        def __iter__(self):
            for k in range(self.start, self.start + self.n):
                yield self.stream.batch(k)

    streams = {}
    for name in ("fmnist-c-recurring", "fmnist-ccc-medium"):
        try:
            streams[name] = tta.streams.load_spec(name).build()
        except TTAError as exc:
            print(f"note: {name} unavailable ({exc})", file=sys.stderr)
    print(f"# {args.batches} batches of 200 from batch {args.start}, {args.threads} thread(s), torch {torch.__version__}, "
          f"{platform.machine()}")
    print("| stream | generation img/s | " + " | ".join(f"{a} img/s" for a in args.adapters.split(",")) +
          " | " + " | ".join(f"{a} run_stream prefetch 0 / 2" for a in args.adapters.split(",")) + " |")
    for name, stream in streams.items():
        t0 = time.perf_counter()
        batches = [stream.batch(k) for k in range(args.start, args.start + args.batches)]
        gen = sum(len(b) for b in batches) / (time.perf_counter() - t0)
        adapt_rates, runs = [], []
        for a in args.adapters.split(","):
            kwargs = {"ap": 0.5555} if a == "cotta" else {}
            adapter = tta.adapt(tta.models.load("resnet20-fmnist"), a, preset="cifar10", **kwargs)
            adapter(batches[0].x)
            t0 = time.perf_counter()
            for b in batches:
                adapter(b.x)
            adapt_rates.append(sum(len(b) for b in batches) / (time.perf_counter() - t0))
            pair = []
            for depth in (0, 2):
                adapter = tta.adapt(tta.models.load("resnet20-fmnist"), a, preset="cifar10", **kwargs)
                r = run_stream(adapter, Slice(stream, args.start, args.batches), device="cpu", prefetch=depth,
                               progress=False, log=lambda _l: None)
                pair.append(r.images_per_s)
            runs.append(pair)
        print(f"| {name} | {gen:.0f} | " + " | ".join(f"{r:.0f}" for r in adapt_rates) + " | " +
              " | ".join(f"{p0:.0f} / {p2:.0f}" for p0, p2 in runs) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
