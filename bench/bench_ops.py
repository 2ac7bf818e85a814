"""Micro-benchmarks of the fused ops against their composite PyTorch / faiss counterparts.

    nice -n 10 .venv/bin/pytest bench/bench_ops.py --benchmark-json=runs/bench_ops.json -q
    .venv/bin/python bench/bench_ops.py runs/bench_ops.json      # ratio table (same run)

Groups pair the implementations measured side by side in one run:
- bn-<shape>: `tta.ops.bn_calibrate` (fused op) vs `composite` (var_mean + mixing + batch_norm), fp32;
  bn-cl-<shape>: the same on channels_last input.
- bn-train-<shape>: forward + backward with batch statistics (TENT's path): the op with its fused
  backward kernel (`op`) vs `F.batch_norm(training=True)` (`composite`).
- knn-M<m>-D<d>-B<b>: `tta.ops.knn_vote` vs `torch` (matmul + topk + softmax + scatter_add) vs
  `faiss` (IndexFlatIP.search + the same vote), k=100, tau=0.1, 10 classes, normalised fp32 rows.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F

import tta.ops

BN_SHAPES = [(200, 16, 32, 32), (200, 64, 8, 8), (64, 256, 14, 14), (64, 64, 56, 56)]
KNN_M = [10_000, 100_000]
KNN_D = [64, 512]
KNN_B = [64, 256]
K, TAU, CLASSES = 100, 0.1, 10


def composite_bn(x, rm, rv, w, b, a, eps):
    var, mean = torch.var_mean(x, dim=[0, 2, 3], unbiased=False)
    return F.batch_norm(x, a * rm + (1 - a) * mean, a * rv + (1 - a) * var, w, b, False, 0.0, eps)


@pytest.mark.parametrize("impl", ["op", "composite"])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("shape", BN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bn_calibrate(benchmark, shape, layout, impl):
    if impl == "op" and tta.ops.backend() == "torch":
        pytest.skip("tta._C not built")
    benchmark.group = f"bn-{'cl-' if layout == 'cl' else ''}" + "x".join(map(str, shape))
    x = torch.randn(shape)
    if layout == "cl":  # channels_last: the composite's batch_norm runs PyTorch's native NHWC kernel
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    rm, rv, w, b = torch.randn(c), torch.rand(c) + 0.5, torch.rand(c), torch.randn(c)
    fn = tta.ops.bn_calibrate if impl == "op" else composite_bn
    with torch.no_grad():
        y = benchmark(fn, x, rm, rv, w, b, 0.9, 1e-5)
    torch.testing.assert_close(y, composite_bn(x, rm, rv, w, b, 0.9, 1e-5), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["op", "composite"])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("shape", BN_SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
def test_bn_train_step(benchmark, shape, layout, impl):
    if impl == "op" and tta.ops.backend() == "torch":
        pytest.skip("tta._C not built")
    benchmark.group = f"bn-train-{'cl-' if layout == 'cl' else ''}" + "x".join(map(str, shape))
    x = torch.randn(shape)
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    c = shape[1]
    rm, rv = torch.zeros(c), torch.ones(c)
    w, b = torch.rand(c, requires_grad=True), torch.randn(c, requires_grad=True)
    gy = torch.randn(shape).contiguous(memory_format=torch.channels_last if layout == "cl" else torch.contiguous_format)

    def step():
        if impl == "op":
            y = tta.ops.bn_calibrate(x, rm, rv, w, b, 0.0, 1e-5)
        else:
            y = F.batch_norm(x, None, None, w, b, True, 0.0, 1e-5)
        x.grad = w.grad = b.grad = None
        y.backward(gy)
        return x.grad

    benchmark(step)


def torch_knn(q, mem, labels):
    sims = F.normalize(q, dim=1) @ mem.T
    v, i = sims.topk(K, dim=1)
    return torch.zeros(q.shape[0], CLASSES).scatter_add_(1, labels[i], torch.softmax(v / TAU, dim=1))


def op_knn(q, mem, labels):
    return tta.ops.knn_vote(F.normalize(q, dim=1), mem, labels, CLASSES, K, TAU, metric="ip")


def faiss_knn(index, q, labels):
    sims, idx = index.search(F.normalize(q, dim=1).numpy(), K)
    v, i = torch.from_numpy(sims), torch.from_numpy(idx)
    return torch.zeros(q.shape[0], CLASSES).scatter_add_(1, labels[i], torch.softmax(v / TAU, dim=1))


_MEMORY: dict[tuple[int, int], tuple] = {}


def _memory(m: int, d: int):
    if (m, d) not in _MEMORY:
        _MEMORY.clear()
        g = torch.Generator().manual_seed(0)
        mem = F.normalize(torch.randn(m, d, generator=g), dim=1)
        _MEMORY[(m, d)] = (mem, torch.randint(0, CLASSES, (m,), generator=g), None)
    return _MEMORY[(m, d)]


@pytest.mark.parametrize("impl", ["op", "torch", "faiss"])
@pytest.mark.parametrize("b", KNN_B)
@pytest.mark.parametrize("d", KNN_D)
@pytest.mark.parametrize("m", KNN_M)
def test_knn_vote(benchmark, m, d, b, impl):
    if impl == "op" and tta.ops.backend() == "torch":
        pytest.skip("tta._C not built")
    benchmark.group = f"knn-M{m}-D{d}-B{b}"
    mem, labels, _ = _memory(m, d)
    q = torch.randn(b, d, generator=torch.Generator().manual_seed(1))
    rounds = 10 if m * d * b <= 10_000 * 512 * 64 else 4
    if impl == "faiss":
        faiss = pytest.importorskip("faiss")
        index = faiss.IndexFlatIP(d)
        index.add(mem.numpy())
        out = benchmark.pedantic(faiss_knn, args=(index, q, labels), rounds=rounds, warmup_rounds=1)
    else:
        fn = op_knn if impl == "op" else torch_knn
        out = benchmark.pedantic(fn, args=(q, mem, labels), rounds=rounds, warmup_rounds=1)
    # same predictions as the plain composite (near-ties aside)
    agree = (out.argmax(1) == torch_knn(q, mem, labels).argmax(1)).float().mean()
    assert agree > 0.95


def ratio_table(path: str) -> str:
    """Markdown table of mean-time ratios per group from a --benchmark-json file."""
    data = json.load(open(path))
    groups: dict[str, dict[str, float]] = {}
    for bench in data["benchmarks"]:
        impl = bench["params"]["impl"]
        groups.setdefault(bench["group"], {})[impl] = bench["stats"]["mean"] * 1e3
    lines = ["| group | times (ms, mean) | ratios |", "|---|---|---|"]
    for group, t in sorted(groups.items()):
        times = ", ".join(f"{k} {v:.2f}" for k, v in t.items())
        if "composite" in t and "op" in t:
            ratios = f"op is {t['composite'] / t['op']:.2f}x faster than composite"
        elif "op" in t:
            parts = [f"torch/op {t['torch'] / t['op']:.2f}x" if "torch" in t else "",
                     f"op/faiss {t['op'] / t['faiss']:.2f}x" if "faiss" in t else ""]
            ratios = ", ".join(p for p in parts if p)
        else:
            ratios = ""
        lines.append(f"| {group} | {times} | {ratios} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(ratio_table(sys.argv[1]))
