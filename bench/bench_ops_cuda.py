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
- knn-M<m>-D<d>-B<b>: `tta.ops.knn_vote` vs matmul + topk + softmax + scatter_add, k=100, tau=0.1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F

import tta.ops
from tta.ops import reference

BN_SHAPES = [(200, 16, 32, 32), (200, 64, 8, 8), (64, 256, 14, 14), (64, 64, 56, 56), (256, 64, 56, 56)]
KNN = [(m, d, b) for m in (10_000, 100_000, 1_000_000) for d in (64, 512) for b in (64, 256)]
K, TAU, CLASSES = 100, 0.1, 10
TOL = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 8e-3}


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


def composite_bn(x, rm, rv, w, b, a, eps):
    var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], unbiased=False)
    return F.batch_norm(x, a * rm + (1 - a) * mean, a * rv + (1 - a) * var, w, b, False, 0.0, eps)


def bn_cases(args):
    for shape in BN_SHAPES:
        for layout in ("nchw", "cl"):
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                if layout == "cl" and dtype != torch.float32:
                    continue
                x = torch.randn(shape, device="cuda").to(dtype)
                if layout == "cl":
                    x = x.contiguous(memory_format=torch.channels_last)
                c = shape[1]
                rm, rv = torch.randn(c, device="cuda"), torch.rand(c, device="cuda") + 0.5
                w, b = torch.rand(c, device="cuda"), torch.randn(c, device="cuda")
                name = "bn-" + "x".join(map(str, shape)) + ("-cl" if layout == "cl" else "")
                name += "" if dtype == torch.float32 else "-" + str(dtype).removeprefix("torch.")
                with torch.no_grad():
                    op = lambda: tta.ops.bn_calibrate(x, rm, rv, w, b, 0.9, 1e-5)  # noqa: E731
                    # the composite in fp32 with one rounding: what the op computes
                    want = composite_bn(x.float(), rm, rv, w, b, 0.9, 1e-5).to(dtype)
                    got = op()
                    torch.testing.assert_close(got.float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype])
                    comp = lambda: composite_bn(x, rm, rv, w, b, 0.9, 1e-5)  # noqa: E731
                    yield name, cuda_time(op, args.iters, args.repeats), cuda_time(comp, args.iters, args.repeats)


def bn_train_cases(args):
    for shape in BN_SHAPES:
        c = shape[1]
        x = torch.randn(shape, device="cuda", requires_grad=True)
        rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
        w = torch.rand(c, device="cuda", requires_grad=True)
        b = torch.randn(c, device="cuda", requires_grad=True)
        gy = torch.randn(shape, device="cuda")

        def step(fused: bool):
            if fused:
                y = tta.ops.bn_calibrate(x, rm, rv, w, b, 0.0, 1e-5)
            else:
                y = F.batch_norm(x, None, None, w, b, True, 0.0, 1e-5)
            x.grad = w.grad = b.grad = None
            y.backward(gy)
            return x.grad, w.grad, b.grad

        for got, want in zip(step(True), step(False)):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
        name = "bn-train-" + "x".join(map(str, shape))
        yield name, cuda_time(lambda: step(True), args.iters, args.repeats), \
            cuda_time(lambda: step(False), args.iters, args.repeats)


def torch_knn(q, mem, labels):
    sims = F.normalize(q, dim=1) @ mem.T
    v, i = sims.topk(K, dim=1)
    return q.new_zeros(q.shape[0], CLASSES).scatter_add_(1, labels[i], torch.softmax(v / TAU, dim=1))


def knn_cases(args):
    g = torch.Generator(device="cuda").manual_seed(0)
    for m, d, b in KNN:
        mem = F.normalize(torch.randn(m, d, device="cuda", generator=g), dim=1)
        labels = torch.randint(0, CLASSES, (m,), device="cuda", generator=g)
        q = torch.randn(b, d, device="cuda", generator=g)
        op = lambda: tta.ops.knn_vote(F.normalize(q, dim=1), mem, labels, CLASSES, K, TAU, metric="ip")  # noqa: E731
        want = reference.knn_vote(F.normalize(q, dim=1), mem, labels, CLASSES, K, TAU, metric="ip")[0]
        got = op()
        agree = float((got.argmax(1) == want.argmax(1)).float().mean())
        if agree < 0.99:
            raise AssertionError(f"knn M{m} D{d} B{b}: op and reference agree on {agree:.3f} of the votes")
        iters = max(1, args.iters // 10) if m >= 1_000_000 else args.iters
        yield f"knn-M{m}-D{d}-B{b}", cuda_time(op, iters, args.repeats), \
            cuda_time(lambda: torch_knn(q, mem, labels), iters, args.repeats)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", choices=["bn", "bn-train", "knn"], default=None)
    ap.add_argument("--out", default=None, help="write the JSON result here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("no CUDA GPU visible")
    if tta.ops.backend() != "cpp+cuda":
        ap.error(f"tta._C has no CUDA kernels (backend {tta.ops.backend()}: {tta.ops.LOAD_ERROR})")
    torch.backends.cuda.matmul.allow_tf32 = False
    suites = {"bn": bn_cases, "bn-train": bn_train_cases, "knn": knn_cases}
    rows = []
    print("| case | op (ms) | composite (ms) | composite / op |\n|---|---|---|---|", flush=True)
    for key, suite in suites.items():
        if args.only and key != args.only:
            continue
        for name, t_op, t_comp in suite(args):
            rows.append({"case": name, "op_ms": t_op, "composite_ms": t_comp, "speedup": t_comp / t_op})
            print(f"| {name} | {t_op:.4f} | {t_comp:.4f} | {t_comp / t_op:.2f}x |", flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "iters": args.iters, "repeats": args.repeats, "cases": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
