"""CUDA kernels of `tta.ops` against their composite PyTorch counterparts, timed with CUDA events.

    python bench/bench_ops_cuda.py --out runs/bench_ops_cuda.json

The GPU twin of `bench_ops.py` (pytest-benchmark times host wall clock, which on a GPU measures
launches, not kernels). Each case runs both implementations side by side in one process: warm-up,
then `--repeats` timings of `--iters` back-to-back calls between two CUDA events; the table gives
the median per call and the ratio composite / op (> 1: the op is faster). Every case first checks
the op against the composite (fp32: 1e-4; half types: one unit in the last place of the output).

- bn-<shape>[-cl][-dtype]: `tta.ops.bn_calibrate` (fused statistics + source mixing + normalise)
  vs var_mean + mixing + `F.batch_norm` (cuDNN/ATen).
- bn-train-<shape>: forward + backward with batch statistics (TENT's path): the op with its fused
  backward vs `F.batch_norm(training=True)`.
- bn-ghost-<shape>-g<groups>[-cl]: `tta.ops.bn_calibrate_grouped` (ghost BN of stacked views, a=0)
  vs the torch composite `tta.ops.reference.bn_calibrate_grouped` (var_mean per group + addcmul).
- knn-M<m>-D<d>-B<b>: `tta.ops.knn_vote` vs matmul + topk + softmax + scatter_add, k=100, tau=0.1.

Achieved bandwidth of the BN op (GB/s = bytes / op time) counts every read and write of a tensor
element once per pass, as the kernels make them, with E = numel(x) * element size:
  forward (statistics pass reads x; normalise pass reads x, writes y):           3 E
  forward + backward (forward 3 E; gradient-sums pass reads dy and x; input-gradient
  pass reads dy and x and writes dx: 5 E):                                        8 E
(per-channel statistics and coefficients are O(C) and left out). "% peak" divides by the
device's peak memory bandwidth, `--peak-gbs` (default 4800 GB/s: NVIDIA H200 SXM datasheet,
"GPU memory bandwidth 4.8TB/s").

Robustness: a case that raises (wrong result, CUDA error, out of memory) is recorded with its error
and the run goes on; a watchdog ends the process (exit 3) when one case runs longer than
`--case-timeout` seconds, after writing the rows measured so far and the stuck case to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import traceback

import torch
import torch.nn.functional as F

import tta.ops
from tta.ops import reference

BN_SHAPES = [(200, 16, 32, 32), (200, 64, 8, 8), (64, 256, 14, 14), (64, 64, 56, 56), (256, 64, 56, 56)]
KNN = [(m, d, b) for m in (10_000, 100_000, 1_000_000) for d in (64, 512) for b in (64, 256)]
KNN += [(100_000, 64, 1), (1_000_000, 64, 8)]  # few queries over a large memory: the split scan
K, TAU, CLASSES = 100, 0.1, 10
TOL = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 8e-3}
H200_PEAK_GBS = 4800.0  # NVIDIA H200 SXM datasheet: 4.8 TB/s HBM3e
BN_PASSES_BYTES = {"forward": 3, "train": 8}  # multiples of numel * element size, see the docstring


def cuda_time(fn, iters: int, repeats: int) -> float:
    """Median milliseconds per call of `fn` over `repeats` event-timed runs of `iters` calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def bn_inputs(shape, layout: str = "nchw", dtype=torch.float32):
    """A random CUDA batch (NCHW or channels_last) and per-channel statistics and affine (fp32)."""
    x = torch.randn(shape, device="cuda").to(dtype)
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    rm, rv = torch.randn(c, device="cuda"), torch.rand(c, device="cuda") + 0.5
    w, b = torch.rand(c, device="cuda"), torch.randn(c, device="cuda")
    return x, rm, rv, w, b


def composite_bn(x, rm, rv, w, b, a, eps):
    var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], unbiased=False)
    return F.batch_norm(x, a * rm + (1 - a) * mean, a * rv + (1 - a) * var, w, b, False, 0.0, eps)


def shape_name(shape) -> str:
    return "x".join(map(str, shape))


def bn_cases(args):
    """Yields (name, thunk); the thunk builds, checks and times one case: dict of the row's fields."""
    for shape in BN_SHAPES:
        for layout in ("nchw", "cl"):
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                if layout == "cl" and dtype != torch.float32:
                    continue
                name = "bn-" + shape_name(shape) + ("-cl" if layout == "cl" else "")
                name += "" if dtype == torch.float32 else "-" + str(dtype).removeprefix("torch.")

                def run(shape=shape, layout=layout, dtype=dtype):
                    x, rm, rv, w, b = bn_inputs(shape, layout, dtype)
                    with torch.no_grad():
                        op = lambda: tta.ops.bn_calibrate(x, rm, rv, w, b, 0.9, 1e-5)  # noqa: E731
                        # the composite in fp32 with one rounding: what the op computes
                        want = composite_bn(x.float(), rm, rv, w, b, 0.9, 1e-5).to(dtype)
                        got = op()
                        torch.testing.assert_close(got.float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype])
                        comp = lambda: composite_bn(x, rm, rv, w, b, 0.9, 1e-5)  # noqa: E731
                        t_op = cuda_time(op, args.iters, args.repeats)
                        t_comp = cuda_time(comp, args.iters, args.repeats)
                    return bandwidth(t_op, t_comp, x, "forward", args.peak_gbs)

                yield name, run


def bandwidth(t_op: float, t_comp: float, x: torch.Tensor, kind: str, peak_gbs: float) -> dict:
    nbytes = BN_PASSES_BYTES[kind] * x.numel() * x.element_size()
    gbs = nbytes / (t_op * 1e-3) / 1e9
    return {"op_ms": t_op, "composite_ms": t_comp, "bytes": nbytes, "op_gbs": gbs, "pct_peak": 100.0 * gbs / peak_gbs}


def bn_train_step(x, rm, rv, w, b, gy, fused: bool):
    """One forward with batch statistics + backward of `gy`: the op (fused backward) or
    `F.batch_norm(training=True)`; returns the gradients of x, w and b."""
    if fused:
        y = tta.ops.bn_calibrate(x, rm, rv, w, b, 0.0, 1e-5)
    else:
        y = F.batch_norm(x, None, None, w, b, True, 0.0, 1e-5)
    x.grad = w.grad = b.grad = None
    y.backward(gy)
    return x.grad, w.grad, b.grad


def bn_train_cases(args):
    for shape in BN_SHAPES:

        def run(shape=shape):
            c = shape[1]
            x = torch.randn(shape, device="cuda", requires_grad=True)
            rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
            w = torch.rand(c, device="cuda", requires_grad=True)
            b = torch.randn(c, device="cuda", requires_grad=True)
            gy = torch.randn(shape, device="cuda")

            def step(fused: bool):
                return bn_train_step(x, rm, rv, w, b, gy, fused)

            for got, want in zip(step(True), step(False)):
                torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
            t_op = cuda_time(lambda: step(True), args.iters, args.repeats)
            t_comp = cuda_time(lambda: step(False), args.iters, args.repeats)
            return bandwidth(t_op, t_comp, x, "train", args.peak_gbs)

        yield "bn-train-" + shape_name(shape), run


# ghost BN of stacked augmented views: (views x batch, C, H, W) in `views` groups; the shapes of
# CoTTA's 32 views of the card's batch of 200 (first stage) and of resnet50's 64 images at 56x56
GHOST = [((6400, 16, 32, 32), 32), ((2048, 64, 56, 56), 32)]


def bn_grouped_cases(args):
    """Ghost BN: `tta.ops.bn_calibrate_grouped` vs the torch composite (var_mean per group + addcmul)."""
    for shape, groups in GHOST:
        for layout in ("nchw", "cl"):

            def run(shape=shape, groups=groups, layout=layout):
                x, rm, rv, w, b = bn_inputs(shape, layout)
                with torch.no_grad():
                    op = lambda: tta.ops.bn_calibrate_grouped(x, rm, rv, w, b, 0.0, 1e-5, groups)  # noqa: E731
                    comp = lambda: reference.bn_calibrate_grouped(x, rm, rv, w, b, 0.0, 1e-5, groups)  # noqa: E731
                    torch.testing.assert_close(op(), comp(), rtol=1e-4, atol=1e-4)
                    t_op = cuda_time(op, max(1, args.iters // 5), args.repeats)
                    t_comp = cuda_time(comp, max(1, args.iters // 5), args.repeats)
                return bandwidth(t_op, t_comp, x, "forward", args.peak_gbs)

            yield f"bn-ghost-{shape_name(shape)}-g{groups}" + ("-cl" if layout == "cl" else ""), run


def torch_knn(q, mem, labels):
    sims = F.normalize(q, dim=1) @ mem.T
    v, i = sims.topk(K, dim=1)
    return q.new_zeros(q.shape[0], CLASSES).scatter_add_(1, labels[i], torch.softmax(v / TAU, dim=1))


def knn_cases(args):
    for m, d, b in KNN:

        def run(m=m, d=d, b=b):
            g = torch.Generator(device="cuda").manual_seed(0)
            mem = F.normalize(torch.randn(m, d, device="cuda", generator=g), dim=1)
            labels = torch.randint(0, CLASSES, (m,), device="cuda", generator=g)
            q = torch.randn(b, d, device="cuda", generator=g)
            op = lambda: tta.ops.knn_vote(F.normalize(q, dim=1), mem, labels, CLASSES, K, TAU, metric="ip")  # noqa: E731
            want = reference.knn_vote(F.normalize(q, dim=1), mem, labels, CLASSES, K, TAU, metric="ip")
            got = tta.ops.knn_vote(F.normalize(q, dim=1), mem, labels, CLASSES, K, TAU, metric="ip",
                                   return_neighbors=True)
            # same neighbour similarity profile (order among near-ties may differ), same votes
            torch.testing.assert_close(got[2], want[2], rtol=0, atol=1e-5)
            agree = float((got[0].argmax(1) == want[0].argmax(1)).float().mean())
            if agree < 0.99:
                raise AssertionError(f"op and reference agree on {agree:.3f} of the votes")
            iters = max(1, args.iters // 10) if m >= 1_000_000 else args.iters
            return {"op_ms": cuda_time(op, iters, args.repeats),
                    "composite_ms": cuda_time(lambda: torch_knn(q, mem, labels), iters, args.repeats)}

        yield f"knn-M{m}-D{d}-B{b}", run


class Watchdog:
    """Ends the process when one case outlives `timeout` s (a hung kernel blocks Python in C)."""

    def __init__(self, timeout: float, on_fire):
        self.timeout, self.on_fire = timeout, on_fire
        self.case, self.started = None, None
        self.lock = threading.Lock()
        threading.Thread(target=self._watch, daemon=True).start()

    def begin(self, case: str) -> None:
        with self.lock:
            self.case, self.started = case, time.monotonic()

    def end(self) -> None:
        with self.lock:
            self.case, self.started = None, None

    def _watch(self) -> None:
        while True:
            time.sleep(1.0)
            with self.lock:
                stuck = self.case if self.started and time.monotonic() - self.started > self.timeout else None
            if stuck:
                self.on_fire(stuck)
                os._exit(3)


def fmt_row(row: dict) -> str:
    if "error" in row:
        return f"| {row['case']} | error | | | | {row['error'].splitlines()[0][:160]} |"
    gbs = f"{row['op_gbs']:.0f} | {row['pct_peak']:.1f}%" if "op_gbs" in row else " | "
    return f"| {row['case']} | {row['op_ms']:.4f} | {row['composite_ms']:.4f} | {row['speedup']:.2f}x | {gbs} |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", choices=["bn", "bn-train", "bn-ghost", "knn"], default=None)
    ap.add_argument("--out", default=None, help="write the JSON result here")
    ap.add_argument("--peak-gbs", type=float, default=H200_PEAK_GBS,
                    help="device peak memory bandwidth for the %% column (default: H200 datasheet, 4800)")
    ap.add_argument("--case-timeout", type=float, default=60.0, help="seconds before a case counts as hung")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("no CUDA GPU visible")
    if tta.ops.backend() != "cpp+cuda":
        ap.error(f"tta._C has no CUDA kernels (backend {tta.ops.backend()}: {tta.ops.LOAD_ERROR})")
    torch.backends.cuda.matmul.allow_tf32 = False
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "iters": args.iters, "repeats": args.repeats, "peak_gbs": args.peak_gbs,
              "bytes_formula": "bn forward: 3 * numel * element_size; bn-train (forward + backward): 8 * numel * "
                               "element_size; GB/s = bytes / op time",
              "cases": []}

    def write(extra: dict | None = None) -> None:
        if args.out:
            with open(args.out, "w") as f:
                json.dump({**result, **(extra or {})}, f, indent=2)

    def on_hang(case: str) -> None:
        print(f"| {case} | hung | | | | over {args.case_timeout:.0f} s: process ended |", flush=True)
        write({"hung_case": case})

    dog = Watchdog(args.case_timeout, on_hang)
    suites = {"bn": bn_cases, "bn-train": bn_train_cases, "bn-ghost": bn_grouped_cases, "knn": knn_cases}
    print("| case | op (ms) | composite (ms) | composite / op | op GB/s | % peak |\n|---|---|---|---|---|---|",
          flush=True)
    failures = 0
    for key, suite in suites.items():
        if args.only and key != args.only:
            continue
        for name, run in suite(args):
            dog.begin(name)
            try:
                row = {"case": name, **run()}
                row["speedup"] = row["composite_ms"] / row["op_ms"]
            except Exception as exc:  # noqa: BLE001  (record and go on to the next case)
                failures += 1
                row = {"case": name, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
                try:
                    torch.cuda.synchronize()
                except Exception:  # noqa: BLE001  (a sticky CUDA error: later cases will say so too)
                    pass
            finally:
                dog.end()
            result["cases"].append(row)
            print(fmt_row(row), flush=True)
            write()
    write({"failures": failures})
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
