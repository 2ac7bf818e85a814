"""Fake (meta) kernels and autograd formulas of the compiled ops (imported once `tta._C` loads).

Fake kernels give torch.compile / export the output shapes, dtypes and strides without running
the op; they mirror the C++ kernels' choices (channels_last in -> channels_last out, fp32
statistics and scores).
"""

from __future__ import annotations

import torch


def _bn_output_like(x: torch.Tensor) -> torch.Tensor:
    fmt = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    if 4 <= x.dim() <= 5 and not x.is_contiguous() and x.is_contiguous(memory_format=fmt):
        return torch.empty_like(x, memory_format=fmt)
    return x.new_empty(x.shape)


@torch.library.register_fake("tta::bn_calibrate")
def _bn_calibrate_fake(x, source_mean, source_var, weight, bias, source_weight, eps):
    c = x.shape[1]
    return _bn_output_like(x), x.new_empty((c,), dtype=torch.float32), x.new_empty((c,), dtype=torch.float32)


@torch.library.register_fake("tta::bn_calibrate_update")
def _bn_calibrate_update_fake(x, running_mean, running_var, weight, bias, source_weight, momentum, eps):
    c = x.shape[1]
    return _bn_output_like(x), x.new_empty((c,), dtype=torch.float32), x.new_empty((c,), dtype=torch.float32)


@torch.library.register_fake("tta::knn_vote")
def _knn_vote_fake(queries, memory, labels, num_classes, k, temperature, metric):
    b = queries.shape[0]
    return (
        queries.new_empty((b, num_classes), dtype=torch.float32),
        queries.new_empty((b, k), dtype=torch.int64),
        queries.new_empty((b, k), dtype=torch.float32),
    )


def _bn_calibrate_backward_fake(grad_y, x, source_mean, source_var, weight, batch_mean, batch_var, source_weight, eps):
    c = x.shape[1]
    return _bn_output_like(x), x.new_empty((c,), dtype=torch.float32), x.new_empty((c,), dtype=torch.float32)


# A library built before the backward kernel existed has no such op: fall back to the formula.
_BACKWARD_OP = hasattr(torch.ops.tta, "bn_calibrate_backward")
if _BACKWARD_OP:
    torch.library.register_fake("tta::bn_calibrate_backward")(_bn_calibrate_backward_fake)


def _has_backward_kernel(device: torch.device) -> bool:
    key = "CUDA" if device.type == "cuda" else "CPU" if device.type == "cpu" else None
    return (
        _BACKWARD_OP
        and key is not None
        and torch._C._dispatch_has_kernel_for_dispatch_key("tta::bn_calibrate_backward", key)
    )


def _bn_setup_context(ctx, inputs, output):
    x, source_mean, source_var, weight, bias, source_weight, eps = inputs
    _, batch_mean, batch_var = output
    ctx.save_for_backward(x, source_mean, source_var, weight, batch_mean, batch_var)
    ctx.source_weight = float(source_weight)
    ctx.eps = float(eps)
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.mark_non_differentiable(batch_mean, batch_var)


def _bn_backward(ctx, grad_y, _grad_mean, _grad_var):
    """Gradient of y = (x - m) * s * w + b with m, v mixing source and batch statistics.

    With g = dy * w, s = rsqrt(v + eps), a = source_weight, n values per channel:
      dL/dm = -s * sum(g),  dL/dv = -s^3 / 2 * sum(g * (x - m)),
      dx = g * s + (1 - a) / n * (dL/dm + 2 * dL/dv * (x - batch_mean)),
      d source_mean = a * dL/dm,  d source_var = a * dL/dv.
    """
    x, source_mean, source_var, weight, batch_mean, batch_var = ctx.saved_tensors
    a, eps = ctx.source_weight, ctx.eps
    grad_x = grad_source_mean = grad_source_var = grad_weight = grad_bias = None
    if _has_backward_kernel(x.device):
        # fused kernel: two passes (per-channel sums, then dx); first-order only
        grad_x, g_weight, g_bias = torch.ops.tta.bn_calibrate_backward(
            grad_y, x, source_mean.float(), source_var.float(), weight, batch_mean, batch_var, a, eps
        )
        s = torch.rsqrt(a * source_var.float() + (1.0 - a) * batch_var + eps)
        w = weight.float() if weight is not None else torch.ones_like(s)
        d_mean = -s * w * g_bias
        d_var = -0.5 * s * s * w * g_weight
    else:
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        n = x.numel() // x.shape[1]
        mean = a * source_mean.float() + (1.0 - a) * batch_mean
        s = torch.rsqrt(a * source_var.float() + (1.0 - a) * batch_var + eps)
        xf = x.float()
        gy = grad_y.float()
        centred = xf - mean.view(shape)
        g = gy * weight.float().view(shape) if weight is not None else gy
        d_mean = -s * g.sum(dims)
        d_var = -0.5 * s.pow(3) * (g * centred).sum(dims)
        g_weight = (gy * centred).sum(dims) * s
        g_bias = gy.sum(dims)
        if ctx.needs_input_grad[0]:
            grad_x = g * s.view(shape) + ((1.0 - a) / n) * (
                d_mean.view(shape) + 2.0 * d_var.view(shape) * (xf - batch_mean.view(shape))
            )
            grad_x = grad_x.to(x.dtype)
    if not ctx.needs_input_grad[0]:
        grad_x = None
    if ctx.needs_input_grad[1]:
        grad_source_mean = (a * d_mean).to(source_mean.dtype)
    if ctx.needs_input_grad[2]:
        grad_source_var = (a * d_var).to(source_var.dtype)
    if ctx.needs_input_grad[3]:
        grad_weight = g_weight.to(weight.dtype)
    if ctx.needs_input_grad[4]:
        grad_bias = g_bias.to(ctx.bias_dtype)
    return grad_x, grad_source_mean, grad_source_var, grad_weight, grad_bias, None, None


torch.library.register_autograd("tta::bn_calibrate", _bn_backward, setup_context=_bn_setup_context)
