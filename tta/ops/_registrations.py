"""Fake (meta) kernels of the compiled ops (imported once `tta._C` loads).

Fake kernels give torch.compile / export the output shapes, dtypes and strides without running
the op; they mirror the C++ kernels' choices (channels_last in -> channels_last out, fp32
statistics and scores).
"""

from __future__ import annotations

import torch

from tta.ops._layout import bn_channels_last_format


def _bn_output_like(x: torch.Tensor) -> torch.Tensor:
    fmt = bn_channels_last_format(x)
    if fmt is not None:
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


if hasattr(torch.ops.tta, "bn_calibrate_grouped"):

    @torch.library.register_fake("tta::bn_calibrate_grouped")
    def _bn_calibrate_grouped_fake(x, source_mean, source_var, weight, bias, source_weight, eps, groups):
        return _bn_output_like(x)


@torch.library.register_fake("tta::knn_vote")
def _knn_vote_fake(queries, memory, labels, num_classes, k, temperature, metric):
    b = queries.shape[0]
    return (
        queries.new_empty((b, num_classes), dtype=torch.float32),
        queries.new_empty((b, k), dtype=torch.int64),
        queries.new_empty((b, k), dtype=torch.float32),
    )


@torch.library.register_fake("tta::bn_calibrate_backward")
def _bn_calibrate_backward_fake(grad_y, x, source_mean, source_var, weight, batch_mean, batch_var, source_weight, eps):
    c = x.shape[1]
    return _bn_output_like(x), x.new_empty((c,), dtype=torch.float32), x.new_empty((c,), dtype=torch.float32)


# The autograd formula of tta::bn_calibrate is registered in C++ (csrc/ops/bn_calibrate.cpp), so
# a training step runs no Python per BatchNorm layer.
