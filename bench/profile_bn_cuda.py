"""Where the time of `tta.ops.bn_calibrate` goes on a GPU: per-kernel device time and host time.

    python bench/profile_bn_cuda.py                      # the shapes of bench_ops_cuda.py's table
    python bench/profile_bn_cuda.py --shapes 64x64x56x56 --layouts cl

`bench_ops_cuda.py` times the op as a whole; this script runs each case `--iters` times under
`torch.profiler` and prints, per kernel, the mean device microseconds per call, and the mean host
(wall) microseconds per call of the whole case, next to the same for the composite (var_mean +
`F.batch_norm`, or `F.batch_norm(training=True)` forward + backward for `--train`). A case whose
device time is far below its host time is launch-bound: fewer launches help it, faster kernels
do not.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import tta.ops
from bench_ops_cuda import bn_inputs, bn_train_step  # this folder is on sys.path when the script runs

SHAPES = ["200x16x32x32", "200x64x8x8", "64x256x14x14", "64x64x56x56", "256x64x56x56"]


def case(shape: tuple[int, ...], layout: str, train: bool, fused: bool):
    x, rm, rv, w, b = bn_inputs(shape, layout)
    if not train:
        if fused:
            return lambda: tta.ops.bn_calibrate(x, rm, rv, w, b, 0.9, 1e-5)

        def composite():
            var, mean = torch.var_mean(x, dim=[0, 2, 3], unbiased=False)
            return F.batch_norm(x, 0.9 * rm + 0.1 * mean, 0.9 * rv + 0.1 * var, w, b, False, 0.0, 1e-5)

        return composite
    x.requires_grad_(True)
    w.requires_grad_(True)
    b.requires_grad_(True)
    gy = torch.randn_like(x)

    return lambda: bn_train_step(x, rm, rv, w, b, gy, fused)


def profile_case(fn, iters: int) -> tuple[dict[str, float], float]:
    ctx = torch.no_grad() if not torch.is_grad_enabled() else torch.enable_grad()
    with ctx:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        host_us = (time.perf_counter() - t) / iters * 1e6
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                fn()
            torch.cuda.synchronize()
    kernels: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels[ev.name[:90]] += ev.device_time / iters
    return dict(kernels), host_us


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--layouts", default="nchw,cl")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--train", action="store_true", help="forward + backward with batch statistics (a = 0)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    print("backend", tta.ops.backend())
    for s in args.shapes.split(","):
        shape = tuple(int(v) for v in s.split("x"))
        for layout in args.layouts.split(","):
            for fused in (True, False):
                torch.set_grad_enabled(args.train)
                kernels, host_us = profile_case(case(shape, layout, args.train, fused), args.iters)
                device_us = sum(kernels.values())
                print(f"{'train' if args.train else 'calib'} {s} {layout} {'op' if fused else 'composite'}: "
                      f"host {host_us:.1f} us/call, device {device_us:.1f} us/call, {len(kernels)} kernels")
                for name, us in sorted(kernels.items(), key=lambda kv: -kv[1]):
                    print(f"    {us:8.1f} us  {name}")


if __name__ == "__main__":
    main()
