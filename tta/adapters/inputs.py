"""What an adapter accepts as a batch, and the checks that hold it to that.

The input contract of an adapted model has two halves, checked at different costs:

- **Structure** (type, rank, dtype, device, channels, spatial size, non-empty): metadata only, read
  on the host without touching the data, so it costs no device synchronisation and no graph break
  under `torch.compile` (dynamo turns these reads into guards). A batch that fails raises
  `InvalidInputError` before anything else happens.
- **Values** (every value finite and inside the model's input range): one fused on-device reduction
  (`torch.aminmax`) that yields a 0-dim boolean *verdict*. When the verdict is read on the host (the
  only synchronising part) is each adapter's choice, see `Adapter.value_check`; a rejected batch
  raises `NonFiniteInputError` or `InputRangeError` before the adapted state changes.

What a model expects is *declared*, most explicit first:

1. the adapter config's ``input_size`` / ``input_range``;
2. attributes on the model: ``tta_input_size = (H, W)`` and ``tta_input_range = (lo, hi)`` (models
   built from a model card by `tta.models.load` carry the card's ``input_size`` and ``(0.0, 1.0)``:
   normalisation lives inside those models);
3. for the size only: a fixed-size patch embedding (timm ``img_size`` with ``strict_img_size``), which
   the model cannot run without.

Nothing declared: the spatial size is not checked (convolutional models run at any size) and values
only have to be finite. The range has no slack: values interpolated past [0, 1] by a bicubic resize
must be clamped, and a float batch left in [0, 255] is caught.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tta.errors import InputRangeError, InvalidInputError, NonFiniteInputError

#: model attributes through which a model declares its input (see the module docstring)
SIZE_ATTR = "tta_input_size"
RANGE_ATTR = "tta_input_range"


def declare_input(model: nn.Module, size: tuple[int, int] | None = None,
                  value_range: tuple[float, float] | None = None) -> nn.Module:
    """Record on `model` the spatial size and value range its inputs must have; returns `model`."""
    if size is not None:
        setattr(model, SIZE_ATTR, _size_pair(size, "input size"))
    if value_range is not None:
        setattr(model, RANGE_ATTR, _range_pair(value_range, "input range"))
    return model


def declared_input_size(model: nn.Module) -> tuple[int, int] | None:
    """(H, W) the model declares (`SIZE_ATTR`) or a fixed-size patch embedding needs; else None."""
    size = getattr(model, SIZE_ATTR, None)
    if size is not None:
        return _size_pair(size, SIZE_ATTR)
    for m in model.modules():
        img_size = getattr(m, "img_size", None)
        # timm PatchEmbed: img_size is enforced unless strict_img_size is off or sizes are dynamic
        if img_size is None or not getattr(m, "strict_img_size", True) or getattr(m, "dynamic_img_size", False):
            continue
        pair = tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size, img_size)
        if len(pair) == 2 and all(isinstance(v, int) and v > 0 for v in pair):
            return (int(pair[0]), int(pair[1]))
    return None


def declared_input_range(model: nn.Module) -> tuple[float, float] | None:
    """(lo, hi) the model declares (`RANGE_ATTR`); else None (values only have to be finite)."""
    value_range = getattr(model, RANGE_ATTR, None)
    return None if value_range is None else _range_pair(value_range, RANGE_ATTR)


def infer_in_channels(model: nn.Module) -> int | None:
    """Input channels of the first convolution (None when the model has none)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return None


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The floating dtype of the model's first floating parameter or buffer (None: none)."""
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    for t in model.buffers():
        if t.is_floating_point():
            return t.dtype
    return None


def check_structure(who: str, x: Any, *, in_channels: int | None, size: tuple[int, int] | None,
                    dtype: torch.dtype | None, device: torch.device) -> None:
    """Raise `InvalidInputError` naming the problem when `x` is not a batch the model can take.

    Reads metadata only (no device synchronisation). Under `torch.autocast` on the batch's device a
    batch in the autocast dtype is accepted beside the model's own dtype.
    """
    if not isinstance(x, torch.Tensor):
        raise InvalidInputError(f"{who}: expected a torch.Tensor batch, got {type(x).__name__}")
    if x.dim() != 4:
        hint = " (a single image? add a batch dimension or use the frame micro-batcher)" if x.dim() == 3 else ""
        raise InvalidInputError(f"{who}: expected a batch of shape (N, C, H, W), got shape {tuple(x.shape)}{hint}")
    if x.device.type == "meta":
        raise InvalidInputError(f"{who}: the batch is a meta tensor (shape {tuple(x.shape)}, no data); "
                                "pass a batch with real values")
    if x.shape[0] == 0:
        raise InvalidInputError(f"{who}: empty batch of shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InvalidInputError(f"{who}: expected a floating-point batch, got dtype {x.dtype} "
                                "(convert uint8 images with x.float() / 255)")
    if in_channels is not None and x.shape[1] != in_channels:
        raise InvalidInputError(f"{who}: the model takes {in_channels} input channel(s), got a batch of shape "
                                f"{tuple(x.shape)} ({x.shape[1]} channels)")
    if size is not None and tuple(x.shape[-2:]) != size:
        raise InvalidInputError(
            f"{who}: the model takes {size[0]}x{size[1]} images, got a batch of shape {tuple(x.shape)}; "
            "resize the images (or set the adapter's input_size when the model runs at other sizes)"
        )
    if x.device != device:
        raise InvalidInputError(f"{who}: the batch is on {x.device} but the adapter is on {device}; "
                                f"move one of them (x.to({str(device)!r}) or adapter.to({str(x.device)!r}))")
    if dtype is not None and x.dtype != dtype and not _autocast_accepts(x):
        raise InvalidInputError(
            f"{who}: the model computes in {_dtype_name(dtype)} but the batch is {_dtype_name(x.dtype)}; convert "
            f"the batch (x.to(torch.{_dtype_name(dtype)})) or the adapter (adapter.to(torch.{_dtype_name(x.dtype)}))"
        )


def value_verdict(x: torch.Tensor, value_range: tuple[float, float] | None) -> torch.Tensor:
    """0-dim bool tensor on `x`'s device: every value finite (and inside `value_range`). No sync."""
    lo, hi = torch.aminmax(x)  # NaN propagates into both
    ok = torch.isfinite(lo) & torch.isfinite(hi)
    if value_range is not None:
        ok = ok & (lo >= value_range[0]) & (hi <= value_range[1])
    return ok


def rejection(who: str, x: torch.Tensor, value_range: tuple[float, float] | None) -> InvalidInputError:
    """The error for a batch whose verdict was false (synchronises; only on the rejection path)."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        images = int(bad.flatten(1).any(1).sum())
        return NonFiniteInputError(f"{who}: {images} of {x.shape[0]} image(s) contain NaN/Inf values; the batch "
                                   "was not adapted on and the adapted state is unchanged")
    lo, hi = (float(v) for v in torch.aminmax(x))
    assert value_range is not None
    return InputRangeError(
        f"{who}: the batch's values span [{lo:.4g}, {hi:.4g}], outside the model's input range "
        f"[{value_range[0]:g}, {value_range[1]:g}]; the batch was not adapted on. Images are float in the "
        "declared range (uint8 images: x.float() / 255; clamp after resizing); set the adapter's input_range "
        "when the model takes other values"
    )


def _autocast_accepts(x: torch.Tensor) -> bool:
    dev = x.device.type
    return torch.is_autocast_enabled(dev) and x.dtype == torch.get_autocast_dtype(dev)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _size_pair(value: Any, what: str) -> tuple[int, int]:
    try:
        pair = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        pair = ()
    if len(pair) != 2 or min(pair) < 1:
        raise InvalidInputError(f"{what} must be (H, W) with positive sides, got {value!r}")
    return (pair[0], pair[1])


def _range_pair(value: Any, what: str) -> tuple[float, float]:
    try:
        pair = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        pair = ()
    if len(pair) != 2 or any(math.isnan(v) for v in pair) or not pair[0] < pair[1]:
        raise InvalidInputError(f"{what} must be (lo, hi) with lo < hi, got {value!r}")
    return (pair[0], pair[1])


__all__ = [
    "RANGE_ATTR",
    "SIZE_ATTR",
    "check_structure",
    "declare_input",
    "declared_input_range",
    "declared_input_size",
    "infer_in_channels",
    "model_dtype",
    "rejection",
    "value_verdict",
]
