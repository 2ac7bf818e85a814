"""`torch.compile(adapted)`: graph breaks, compile time and step time against eager, per adapter.

For each adapter (default: source, bn, alpha-bn, tent) on ResNet-20 (the shipped card's
architecture, random weights; the weights do not change the graph):

- `torch._dynamo.explain`: graphs, graph breaks and where each break comes from;
- `torch.compile(adapted)` (inductor, the default backend): time of the first call (compilation);
- step time of the compiled and an eager twin, interleaved call by call on the same batches
  (median of ``--reps``), and the largest output difference between the two;
- the cost of the per-batch input checks in eager mode (structure + on-device value verdict + its
  read), beside the source model's forward on the same batches.

    .venv/bin/python bench/bench_compile.py --batch 200 --reps 20
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tta  # noqa: E402
from tta.adapters.inputs import declare_input, value_verdict  # noqa: E402
from tta.models import build_model  # noqa: E402


def break_sites(explanation) -> list[str]:
    sites = []
    for reason in explanation.break_reasons:
        frame = reason.user_stack[-1] if reason.user_stack else None
        where = f"{Path(frame.filename).name}:{frame.lineno} {frame.name}" if frame else "?"
        sites.append(f"{reason.reason.splitlines()[0][:70]} ({where})")
    return sites


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", default="source,bn,alpha-bn,tent")
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = declare_input(build_model("resnet20", num_classes=10).eval(), (32, 32), (0.0, 1.0))  # as card models
    batches = [torch.rand(args.batch, 3, 32, 32) for _ in range(args.reps + 1)]
    checker = tta.adapt(base, "source")
    t_check, t_forward = [], []
    with torch.no_grad():
        for x in batches:
            t0 = time.perf_counter()
            checker.validate_batch(x)
            bool(value_verdict(x, checker.input_range))
            t_check.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            checker.model(x)
            t_forward.append(time.perf_counter() - t0)
    check_ms, forward_ms = statistics.median(t_check) * 1e3, statistics.median(t_forward) * 1e3
    rows = []
    for name in args.adapters.split(","):
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(tta.adapt(base, name, seed=0))(batches[0])
        eager = tta.adapt(base, name, seed=0)
        compiled_adapter = tta.adapt(base, name, seed=0)
        compiled = torch.compile(compiled_adapter)
        t0 = time.perf_counter()
        first = compiled(batches[0])
        compile_s = time.perf_counter() - t0
        ref = eager(batches[0])
        diff = float((first - ref).abs().max())
        t_eager, t_comp = [], []
        for x in batches[1:]:
            t0 = time.perf_counter()
            a = eager(x)
            t_eager.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            b = compiled(x)
            t_comp.append(time.perf_counter() - t0)
            diff = max(diff, float((a - b).abs().max()))
        e, c = statistics.median(t_eager) * 1e3, statistics.median(t_comp) * 1e3
        rows.append((name, explanation.graph_count, explanation.graph_break_count, compile_s, e, c, diff,
                     break_sites(explanation)))
        print(f"{name}: {explanation.graph_count} graph(s), {explanation.graph_break_count} break(s); "
              f"compile {compile_s:.1f} s; eager {e:.1f} ms, compiled {c:.1f} ms ({e / c:.2f}x); "
              f"max |diff| {diff:.2e}", flush=True)
        for site in break_sites(explanation):
            print(f"    break: {site}", flush=True)
    print(f"\nResNet-20, batch {args.batch}x3x32x32, {args.threads} thread(s), torch {torch.__version__}, "
          f"median of {args.reps}")
    print("| adapter | graphs | graph breaks | first call (compile) | eager step | compiled step | eager/compiled | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for name, graphs, breaks, compile_s, e, c, diff, _ in rows:
        print(f"| {name} | {graphs} | {breaks} | {compile_s:.1f} s | {e:.1f} ms | {c:.1f} ms | {e / c:.2f}x | {diff:.1e} |")
    print(f"\ninput checks (structure + value verdict + read): {check_ms:.2f} ms per batch, source forward "
          f"{forward_ms:.1f} ms ({100 * check_ms / forward_ms:.2f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
