"""tta::bn_calibrate / tta::bn_calibrate_update: compiled kernels against the torch reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tta.ops
from tta.errors import InvalidInputError
from tta.layers import CalibratedBatchNorm
from tta.ops import reference
from ops_testing import DEVICES, DTYPES, assert_close, requires_compiled

pytestmark = requires_compiled

# (shape, layout): C not a multiple of 32, one value per channel, BN1d input, 3-D volumes,
# channels_last, and non-contiguous views.
CASES = [
    ((8, 19, 7, 5), "contiguous"),
    ((8, 19, 7, 5), "channels_last"),
    ((8, 19, 7, 5), "strided"),
    ((1, 5, 1, 1), "contiguous"),
    ((1, 5, 1, 1), "channels_last"),
    ((16, 33), "contiguous"),
    ((16, 33), "strided"),
    ((3, 6, 4), "contiguous"),
    ((2, 7, 3, 4, 5), "channels_last"),
    ((4, 64, 40, 40), "contiguous"),
    ((4, 40, 9, 9), "channels_last"),
]


def make_input(shape, layout, dtype, device, scale=3.0, offset=1.0):
    if layout == "strided":  # every other element of the last dim: not contiguous in any format
        full = list(shape)
        full[-1] *= 2
        x = (torch.randn(full, device=device) * scale + offset)[..., ::2]
        assert not x.is_contiguous()
        return x.to(dtype) if dtype != torch.float32 else x
    x = (torch.randn(shape, device=device) * scale + offset).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)
    return x


def make_stats(c, device, affine=True, affine_dtype=torch.float32):
    mean = torch.randn(c, device=device) * 0.5
    var = torch.rand(c, device=device) + 0.5
    w = (torch.rand(c, device=device) + 0.5).to(affine_dtype) if affine else None
    b = torch.randn(c, device=device).to(affine_dtype) if affine else None
    return mean, var, w, b


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("source_weight", [0.0, 0.3, 1.0])
def test_matches_reference(shape, layout, dtype, device, source_weight):
    x = make_input(shape, layout, dtype, device)
    mean, var, w, b = make_stats(shape[1], device)
    y, bm, bv = torch.ops.tta.bn_calibrate(x, mean, var, w, b, source_weight, 1e-5)
    y_ref, bm_ref, bv_ref = reference.bn_calibrate_stats(x, mean, var, w, b, source_weight, 1e-5)
    assert y.dtype == x.dtype and y.shape == x.shape and bm.dtype == torch.float32
    assert_close(y, y_ref, dtype, "output")
    assert_close(bm, bm_ref, torch.float32, "batch mean")
    assert_close(bv, bv_ref, torch.float32, "batch var")
    if layout == "channels_last":
        fmt = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
        assert y.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("device", DEVICES)
def test_no_affine_and_low_precision_affine(device):
    x = make_input((6, 12, 5, 5), "contiguous", torch.float16, device)
    mean, var, _, _ = make_stats(12, device, affine=False)
    y = tta.ops.bn_calibrate(x, mean, var, None, None, 0.5, 1e-3)
    assert_close(y, reference.bn_calibrate(x, mean, var, None, None, 0.5, 1e-3), torch.float16)
    _, _, w, b = make_stats(12, device, affine_dtype=torch.float16)
    y = tta.ops.bn_calibrate(x, mean, var, w, b, 0.5, 1e-3)
    assert_close(y, reference.bn_calibrate(x, mean, var, w, b, 0.5, 1e-3), torch.float16)


@pytest.mark.parametrize("device", DEVICES)
def test_statistics_stable_with_large_offset(device):
    # mean 1e4, std 1: a naive sum-of-squares fp32 variance loses every digit here
    x = torch.randn(16, 8, 32, 32, device=device, dtype=torch.float64) + 1e4
    mean, var, w, b = make_stats(8, device)
    _, bm, bv = torch.ops.tta.bn_calibrate(x.float(), mean, var, w, b, 0.0, 1e-5)
    exact = x.var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(bv.double(), exact, rtol=2e-3, atol=0)
    torch.testing.assert_close(bm.double(), x.mean(dim=(0, 2, 3)), rtol=1e-6, atol=0)
    xh = (torch.randn(64, 4, 16, 16, device=device) + 100).half()
    _, _, bvh = torch.ops.tta.bn_calibrate(xh, mean[:4], var[:4], None, None, 0.0, 1e-5)
    torch.testing.assert_close(bvh.double(), xh.double().var(dim=(0, 2, 3), unbiased=False), rtol=1e-3, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", ["offset", "first-sample-outlier", "tiny-variance"])
def test_statistics_accurate_when_the_first_values_are_unrepresentative(device, layout, case):
    # The CPU kernels shift their one-pass sums by a reference taken from the first plane / row
    # block; data whose first sample or first rows sit far from the rest must not cost accuracy.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, 32, 32, generator=g, dtype=torch.float64)
    if case == "offset":
        x += 1e4
    elif case == "first-sample-outlier":
        x[0] += 100
        x[:, :, :2] += 30
    else:
        x = x * 1e-3 + 5
    xf = x.float().to(device).contiguous(memory_format=torch.channels_last if layout == "channels_last"
                                         else torch.contiguous_format)
    mean, var, _, _ = make_stats(8, device)
    _, bm, bv = torch.ops.tta.bn_calibrate(xf, mean, var, None, None, 0.0, 1e-5)
    exact = xf.double()
    cpu = torch.device(device).type == "cpu"  # the CUDA kernels keep the looser bound of the test above
    torch.testing.assert_close(bv.double(), exact.var(dim=(0, 2, 3), unbiased=False), rtol=1e-5 if cpu else 2e-3, atol=0)
    torch.testing.assert_close(bm.double(), exact.mean(dim=(0, 2, 3)), rtol=1e-6 if cpu else 1e-5, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,layout", [((8, 19, 7, 5), "contiguous"), ((8, 19, 7, 5), "channels_last"),
                                          ((16, 33), "contiguous"), ((8, 4, 48, 48), "contiguous")])
def test_update_variant_moves_running_stats(shape, layout, device):
    x = make_input(shape, layout, torch.float32, device)
    mean, var, w, b = make_stats(shape[1], device)
    rm, rv = mean.clone(), var.clone()
    y, bm, bv = torch.ops.tta.bn_calibrate_update(x, rm, rv, w, b, 0.2, 0.1, 1e-5)
    rm_ref, rv_ref = mean.clone(), var.clone()
    y_ref, _, _ = reference.bn_calibrate_update_(x, rm_ref, rv_ref, w, b, 0.2, 0.1, 1e-5)
    assert_close(y, y_ref, torch.float32)
    assert_close(rm, rm_ref, torch.float32)
    assert_close(rv, rv_ref, torch.float32)
    n = x.numel() // shape[1]
    torch.testing.assert_close(rv, 0.9 * var + 0.1 * bv * n / (n - 1))
    # public wrapper: same result, mutating in place
    rm2, rv2 = mean.clone(), var.clone()
    assert_close(tta.ops.bn_calibrate_update_(x, rm2, rv2, w, b, 0.2, 0.1, 1e-5), y_ref, torch.float32)
    assert_close(rm2, rm_ref, torch.float32)


def _bn_samples():
    samples = []
    for shape, layout in [((4, 5, 3, 3), "contiguous"), ((4, 5, 3, 3), "channels_last"), ((6, 7), "contiguous"),
                          ((1, 3, 1, 1), "contiguous"), ((4, 5, 3, 6), "strided")]:
        x = make_input(shape, layout, torch.float32, "cpu")
        mean, var, w, b = make_stats(shape[1], "cpu")
        samples.append((x.requires_grad_(), mean, var, w.requires_grad_(), b.requires_grad_(), 0.3, 1e-5))
        samples.append((x.detach().half(), mean, var, None, None, 0.0, 1e-3))
    return samples


@pytest.mark.parametrize("sample", range(10))
def test_opcheck_bn_calibrate(sample):
    torch.library.opcheck(torch.ops.tta.bn_calibrate.default, _bn_samples()[sample])


def test_opcheck_bn_calibrate_update():
    for shape, layout in [((4, 5, 3, 3), "contiguous"), ((4, 5, 3, 3), "channels_last"), ((6, 7), "contiguous")]:
        x = make_input(shape, layout, torch.float32, "cpu")
        mean, var, w, b = make_stats(shape[1], "cpu")
        torch.library.opcheck(torch.ops.tta.bn_calibrate_update.default, (x, mean, var, w, b, 0.3, 0.1, 1e-5))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("source_weight", [0.0, 0.4])
def test_gradients_match_reference(layout, source_weight):
    x = make_input((6, 9, 5, 4), layout, torch.float32, "cpu")
    mean, var, w, b = make_stats(9, "cpu")
    grads = []
    for fn in (lambda *a: torch.ops.tta.bn_calibrate(*a)[0], reference.bn_calibrate):
        xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
        y = fn(xs, mean, var, ws, bs, source_weight, 1e-5)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads.append((xs.grad, ws.grad, bs.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("affine", [True, False])
def test_gradients_of_the_source_statistics_match_reference(affine):
    """Rarely needed (source statistics are buffers), but the C++ autograd formula provides them."""
    x = make_input((5, 6, 4, 3), "contiguous", torch.float32, "cpu")
    mean, var, w, b = make_stats(6, "cpu")
    grads = []
    for fn in (lambda *a: torch.ops.tta.bn_calibrate(*a)[0], reference.bn_calibrate):
        xs, ms, vs = (t.detach().clone().requires_grad_() for t in (x, mean, var))
        y = fn(xs, ms, vs, w if affine else None, b if affine else None, 0.4, 1e-5)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads.append((xs.grad, ms.grad, vs.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_only_the_needed_gradients_are_produced():
    x = make_input((4, 3, 2, 2), "contiguous", torch.float32, "cpu").requires_grad_()
    mean, var, w, b = make_stats(3, "cpu")
    w.requires_grad_()
    y, bm, bv = torch.ops.tta.bn_calibrate(x, mean, var, w, b, 0.0, 1e-5)
    assert not bm.requires_grad and not bv.requires_grad  # statistics are non-differentiable
    y.sum().backward()
    assert x.grad is not None and w.grad is not None and b.grad is None and mean.grad is None


def test_calibrated_layer_uses_op_and_backprops():
    bn = nn.BatchNorm2d(12)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 1.5)
    layer = CalibratedBatchNorm.from_batchnorm(bn, source_weight=0.25)
    x = torch.randn(8, 12, 6, 6, requires_grad=True)
    y = layer(x)
    y_ref = reference.bn_calibrate(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, 0.25, bn.eps)
    assert_close(y, y_ref, torch.float32)
    y.square().mean().backward()
    assert x.grad is not None and layer.weight.grad is not None and layer.bias.grad is not None


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("source_weight", [0.0, 0.25])
def test_layer_dispatch_between_op_and_native_batch_norm(monkeypatch, layout, source_weight):
    # Batch statistics only (a = 0) on channels_last CPU input go to PyTorch's native kernel (measured
    # faster there); everything else with a compiled kernel goes to the op. Same values either way.
    layer = CalibratedBatchNorm.from_batchnorm(nn.BatchNorm2d(12), source_weight=source_weight)
    x = torch.randn(8, 12, 6, 6)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    calls = []
    op = tta.ops.bn_calibrate
    monkeypatch.setattr(tta.ops, "bn_calibrate", lambda *a, **k: calls.append(1) or op(*a, **k))
    y = layer(x)
    native = layout == "channels_last" and source_weight == 0.0
    assert bool(calls) != native
    y_ref = reference.bn_calibrate(x, layer.running_mean, layer.running_var, layer.weight, layer.bias,
                                   source_weight, layer.eps)
    assert_close(y, y_ref, torch.float32)


def test_bad_input_raises_clear_errors():
    mean, var, w, b = make_stats(4, "cpu")
    with pytest.raises(InvalidInputError, match="channels"):
        tta.ops.bn_calibrate(torch.randn(2, 5, 3, 3), mean, var, w, b, 0.5, 1e-5)
    with pytest.raises(InvalidInputError, match="empty"):
        tta.ops.bn_calibrate(torch.randn(0, 4, 3, 3), mean, var, w, b, 0.5, 1e-5)
    with pytest.raises(RuntimeError, match="float32/float16/bfloat16"):
        torch.ops.tta.bn_calibrate(torch.ones(2, 4, 3, 3, dtype=torch.int32), mean, var, w, b, 0.5, 1e-5)


@pytest.mark.slow
def test_torch_compile_fullgraph_equals_eager():
    torch._dynamo.reset()

    def f(x, mean, var, w, b, rm, rv):
        y = tta.ops.bn_calibrate(x, mean, var, w, b, 0.3, 1e-5)
        z = tta.ops.bn_calibrate_update_(y.relu(), rm, rv, None, None, 0.5, 0.1, 1e-5)
        return z * 2

    x = make_input((4, 6, 5, 5), "channels_last", torch.float32, "cpu")
    mean, var, w, b = make_stats(6, "cpu")
    rm_e, rv_e, rm_c, rv_c = mean.clone(), var.clone(), mean.clone(), var.clone()
    eager = f(x, mean, var, w, b, rm_e, rv_e)
    compiled = torch.compile(f, fullgraph=True)(x, mean, var, w, b, rm_c, rv_c)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(rm_c, rm_e)
    torch.testing.assert_close(rv_c, rv_e)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", [((8, 19, 7, 5), "contiguous"), ((8, 19, 7, 5), "channels_last"),
                                          ((16, 33), "contiguous"), ((4, 6, 5, 8), "strided")], ids=str)
def test_backward_kernel_matches_formula(shape, layout, dtype, device):
    x = make_input(shape, layout, dtype, device)
    mean, var, w, b = make_stats(shape[1], device)
    gy = torch.randn(x.shape, device=device).to(dtype)
    _, bm, bv = torch.ops.tta.bn_calibrate(x, mean, var, w, b, 0.3, 1e-5)
    dx, dw, db = torch.ops.tta.bn_calibrate_backward(gy, x, mean, var, w, bm, bv, 0.3, 1e-5)
    xr, wr, br = (t.detach().float().clone().requires_grad_() for t in (x, w, b))
    reference.bn_calibrate(xr, mean, var, wr, br, 0.3, 1e-5).backward(gy.float())
    rtol, atol = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}[dtype]
    torch.testing.assert_close(dx.float(), xr.grad, rtol=rtol, atol=atol * float(xr.grad.abs().max()))
    torch.testing.assert_close(dw, wr.grad, rtol=rtol, atol=atol * float(wr.grad.abs().max()))
    torch.testing.assert_close(db, br.grad, rtol=rtol, atol=atol * float(br.grad.abs().max()))


def test_opcheck_bn_calibrate_backward():
    for shape, layout in [((4, 5, 3, 3), "contiguous"), ((4, 5, 3, 3), "channels_last"), ((6, 7), "contiguous")]:
        x = make_input(shape, layout, torch.float32, "cpu")
        mean, var, w, _ = make_stats(shape[1], "cpu")
        _, bm, bv = torch.ops.tta.bn_calibrate(x, mean, var, w, None, 0.3, 1e-5)
        torch.library.opcheck(torch.ops.tta.bn_calibrate_backward.default,
                              (torch.randn(shape), x, mean, var, w, bm, bv, 0.3, 1e-5))


# Inputs that steer the CUDA kernels through each of their paths: 16-byte packs or one value per
# load (plane or channel count not a multiple of the pack, or a storage offset that breaks the
# alignment), one sample, a channel split over many blocks, channels_last with C under / over one
# block of lanes.
KERNEL_PATH_CASES = [
    ((1, 3, 5, 7), "contiguous"),  # B=1, odd plane: single values
    ((2, 8, 4, 4), "contiguous"),  # packs of 4 (fp32) and 8 (half types)
    ((3, 5, 6, 2), "contiguous"),  # plane of 12: fp32 packs, half types single values
    ((1, 64, 56, 56), "contiguous"),  # B=1, large planes: one block per channel (fused path)
    ((4, 8, 64, 64), "contiguous"),  # exactly the fused path's limit of 16,384 values per channel
    ((4, 8, 64, 65), "contiguous"),  # one plane row over it: the three-pass path
    ((2, 64, 96, 96), "contiguous"),  # B=2, large planes split over blocks
    ((32, 64, 28, 28), "contiguous"),  # many splits per channel
    ((16, 16, 32, 32), "channels_last"),  # C=16: fewer packs per row than lanes
    ((4, 20, 8, 8), "channels_last"),  # C=20: fp32 packs, half types single values
    ((2, 264, 3, 3), "channels_last"),  # more packs per row than one block's lanes
    ((8, 16, 8, 8), "misaligned"),  # storage offset of one element: single values
    ((8, 24, 9, 8), "misaligned-channels_last"),
]


def make_path_input(shape, layout, dtype, device):
    if not layout.startswith("misaligned"):
        return make_input(shape, layout, dtype, device)
    n, c, h, w = shape
    base = (torch.randn(n * c * h * w + 1, device=device) * 3.0 + 1.0).to(dtype)[1:]
    if layout == "misaligned":
        return base.view(shape)
    return base.view(n, h, w, c).permute(0, 3, 1, 2)  # channels_last strides, offset storage


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", KERNEL_PATH_CASES, ids=str)
def test_kernel_paths_forward_and_backward(shape, layout, dtype, device):
    x = make_path_input(shape, layout, dtype, device)
    assert layout != "misaligned-channels_last" or x.is_contiguous(memory_format=torch.channels_last)
    mean, var, w, b = make_stats(shape[1], device)
    y, bm, bv = torch.ops.tta.bn_calibrate(x, mean, var, w, b, 0.3, 1e-5)
    y_ref, bm_ref, bv_ref = reference.bn_calibrate_stats(x, mean, var, w, b, 0.3, 1e-5)
    assert_close(y, y_ref, dtype, "output")
    assert_close(bm, bm_ref, torch.float32, "batch mean")
    assert_close(bv, bv_ref, torch.float32, "batch var")
    gy = torch.randn(x.shape, device=device).to(dtype)
    dx, dw, db = torch.ops.tta.bn_calibrate_backward(gy, x, mean, var, w, bm, bv, 0.3, 1e-5)
    xr, wr, br = (t.detach().float().clone().requires_grad_() for t in (x, w, b))
    reference.bn_calibrate(xr, mean, var, wr, br, 0.3, 1e-5).backward(gy.float())
    rtol, atol = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}[dtype]
    torch.testing.assert_close(dx.float(), xr.grad, rtol=rtol, atol=atol * float(xr.grad.abs().max()))
    torch.testing.assert_close(dw, wr.grad, rtol=rtol, atol=atol * float(wr.grad.abs().max()))
    torch.testing.assert_close(db, br.grad, rtol=rtol, atol=atol * float(br.grad.abs().max()))


# Ghost BatchNorm (tta::bn_calibrate_grouped): every group equals bn_calibrate of its batch slice
# alone. Shapes steer the CUDA kernel through the fused one-launch path (small groups), the
# three-pass path (groups over 16,384 values per channel), channels_last rows, single-value loads
# and one sample per group.
GROUPED_CASES = [
    ((12, 5, 4, 4), "contiguous", 3),  # fused path, plane of 16: packs
    ((8, 6, 5, 3), "contiguous", 4),  # plane of 15: single values
    ((64, 8, 32, 32), "contiguous", 2),  # 32,768 values per (group, channel): three passes
    ((16, 24, 8, 8), "channels_last", 4),  # rows, packs
    ((6, 20, 5, 5), "channels_last", 3),  # rows, fp16/bf16 single values (20 % 8)
    ((4, 3, 7, 7), "contiguous", 4),  # one sample per group
    ((9, 7), "contiguous", 3),  # BN1d input: one value per channel and sample
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout,groups", GROUPED_CASES, ids=str)
@pytest.mark.parametrize("source_weight", [0.0, 0.3])
def test_grouped_op_equals_bn_calibrate_per_slice(shape, layout, groups, dtype, device, source_weight):
    x = make_input(shape, layout, dtype, device)
    mean, var, w, b = make_stats(shape[1], device)
    y = torch.ops.tta.bn_calibrate_grouped(x, mean, var, w, b, source_weight, 1e-5, groups)
    assert y.dtype == x.dtype and y.shape == x.shape
    n = shape[0] // groups
    want = torch.cat([reference.bn_calibrate(x[g * n:(g + 1) * n].float(), mean, var, w, b, source_weight, 1e-5)
                      for g in range(groups)])
    assert_close(y, want.to(dtype), dtype, "grouped output")
    ref = reference.bn_calibrate_grouped(x, mean, var, w, b, source_weight, 1e-5, groups)
    assert_close(ref, want.to(dtype), dtype, "grouped reference")


@pytest.mark.parametrize("device", DEVICES)
def test_grouped_op_rejects_bad_groups_and_runs_the_reference_with_gradients(device):
    x = make_input((6, 4, 3, 3), "contiguous", torch.float32, device)
    mean, var, w, b = make_stats(4, device)
    with pytest.raises(InvalidInputError, match="not divisible into 4 groups"):
        tta.ops.bn_calibrate_grouped(x, mean, var, w, b, 0.0, 1e-5, 4)
    if device == "cpu":
        with pytest.raises(RuntimeError, match="not divisible"):
            torch.ops.tta.bn_calibrate_grouped(x, mean, var, w, b, 0.0, 1e-5, 0)
    xr = x.clone().requires_grad_()
    y = tta.ops.bn_calibrate_grouped(xr, mean, var, w, b, 0.0, 1e-5, 3)  # differentiable reference
    y.square().sum().backward()
    assert xr.grad is not None and torch.isfinite(xr.grad).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_ghost_groups_of_the_layer_equal_separate_forwards(device, layout):
    """CalibratedBatchNorm with ghost_groups = G (the path of the teacher's stacked views; on CUDA
    the compiled grouped kernel) equals G separate forwards of its batch slices."""
    layer = CalibratedBatchNorm.from_batchnorm(nn.BatchNorm2d(12), 0.2).to(device)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
        layer.running_mean.uniform_(-1, 1)
    x = make_input((20, 12, 6, 6), layout, torch.float32, device)
    with torch.no_grad():
        separate = torch.cat([layer(x[i * 4:(i + 1) * 4]) for i in range(5)])
        layer.ghost_groups = 5
        batched = layer(x)
    torch.testing.assert_close(batched, separate, atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or tta.ops.backend() != "cpp+cuda",
                    reason="needs a CUDA GPU and tta._C built with CUDA")
def test_an_error_raised_in_the_cuda_source_reaches_python():
    """A TORCH_CHECK that fails inside csrc/cuda/ raises RuntimeError in Python. Run in a child
    process: on one GPU machine such a failure aborted the interpreter instead, and an abort must
    fail this test alone, not end the session."""
    import subprocess
    import sys

    code = (
        "import torch, tta.ops\n"
        "x = torch.zeros(6, 4, 3, 3, device='cuda'); m = torch.zeros(4, device='cuda'); v = torch.ones(4, device='cuda')\n"
        "try:\n"
        "    torch.ops.tta.bn_calibrate_grouped(x, m, v, None, None, 0.0, 1e-5, 4)\n"
        "except RuntimeError as e:\n"
        "    print('raised:', str(e).splitlines()[0])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "raised: " in proc.stdout and "not divisible" in proc.stdout, (
        f"exit {proc.returncode}\nstdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-4000:]}")
