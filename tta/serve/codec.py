"""Request bodies of the serving endpoint -> a float32 NCHW batch in [0, 1], checked against the card.

Accepted bodies (``Content-Type``):

- ``application/x-npy`` (or ``application/octet-stream`` holding an ``.npy`` file): an array of shape
  (N, C, H, W) or (N, H, W, C), uint8 (0..255) or float32/float16/float64 in [0, 1]; a single image
  (3-D) is not guessed at: send N = 1. Read with ``allow_pickle=False``: object arrays are refused.
- ``image/png``, ``image/jpeg``, ... : one encoded image (Pillow);
- ``application/json``: ``{"stream": ID, "images": [base64, ...]}`` (encoded images) or
  ``{"stream": ID, "npy": base64}``.

Images are converted to the card's channels (grey or RGB) but never resized: an image whose size is
not the card's ``input_size`` is an error, like any other shape that does not fit. Every failure is a
`RequestError` carrying the HTTP status (400, 413 for oversized bodies, 415 for unknown types).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from tta.errors import InvalidInputError

NPY_TYPES = ("application/x-npy", "application/npy", "application/octet-stream")
JSON_TYPES = ("application/json",)
#: float pixel values outside [0, 1] by more than this are rejected (a float array of 0..255 values)
RANGE_SLACK = 1e-3


class RequestError(InvalidInputError):
    """A request the service refuses; `status` is the HTTP status code to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class InputSpec:
    """What a request must fit: the card's (C, H, W), and the request limits."""

    input_size: tuple[int, int, int]
    max_images: int = 512
    max_bytes: int = 16 * 2**20

    @property
    def channels(self) -> int:
        return self.input_size[0]


def decode_body(body: bytes, content_type: str | None, spec: InputSpec) -> tuple[np.ndarray, str | None]:
    """(batch float32 (N, C, H, W) in [0, 1], stream id named in a JSON body or None)."""
    if len(body) > spec.max_bytes:
        raise RequestError(f"request body of {len(body)} bytes exceeds the limit of {spec.max_bytes} bytes", 413)
    if not body:
        raise RequestError("empty request body: send an .npy array or encoded images")
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind in JSON_TYPES:
        return _decode_json(body, spec)
    if kind in NPY_TYPES or (not kind and body[:6] == b"\x93NUMPY"):
        return decode_npy(body, spec), None
    if kind.startswith("image/"):
        return check_batch(_decode_images([body], spec), spec), None
    raise RequestError(f"unsupported Content-Type {content_type!r}: use application/x-npy, image/png, image/jpeg "
                       "or application/json", 415)


def _decode_json(body: bytes, spec: InputSpec) -> tuple[np.ndarray, str | None]:
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise RequestError("a JSON request is an object: {\"stream\": ID, \"images\": [base64, ...]} or "
                           "{\"stream\": ID, \"npy\": base64}")
    stream = doc.get("stream")
    if stream is not None and not isinstance(stream, str):
        raise RequestError(f"\"stream\" must be a string, got {type(stream).__name__}")
    if ("images" in doc) == ("npy" in doc):
        raise RequestError("a JSON request holds exactly one of \"images\" (a list of base64 images) or \"npy\"")
    if "npy" in doc:
        return decode_npy(_b64(doc["npy"], "npy"), spec), stream
    images = doc["images"]
    if not isinstance(images, list) or not images:
        raise RequestError("\"images\" must be a non-empty list of base64-encoded images")
    if len(images) > spec.max_images:
        raise RequestError(f"{len(images)} images in one request exceed the limit of {spec.max_images}", 413)
    raw = [_b64(item, f"images[{i}]") for i, item in enumerate(images)]
    return check_batch(_decode_images(raw, spec), spec), stream


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise RequestError(f"{what} must be a base64 string, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(f"{what} is not valid base64: {exc}") from None


def _decode_images(blobs: list[bytes], spec: InputSpec) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    c, h, w = spec.input_size
    out = np.empty((len(blobs), h, w, c), dtype=np.uint8)
    for i, blob in enumerate(blobs):
        try:
            with Image.open(io.BytesIO(blob)) as img:
                img.load()
                if img.size != (w, h):
                    raise RequestError(f"image {i} is {img.size[0]}x{img.size[1]} (WxH); the model takes {w}x{h} "
                                       "images (resize on the client)")
                arr = np.asarray(img.convert("L" if c == 1 else "RGB"))
        except RequestError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            raise RequestError(f"image {i} could not be decoded: {exc}") from None
        out[i] = arr.reshape(h, w, c)
    return out.transpose(0, 3, 1, 2).astype(np.float32) / 255.0


def decode_npy(data: bytes, spec: InputSpec) -> np.ndarray:
    """An ``.npy`` payload -> a checked float32 NCHW batch (channels-last input is transposed)."""
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise RequestError(f"body is not a readable .npy array (object arrays are refused): {exc}") from None
    if not isinstance(arr, np.ndarray):
        raise RequestError("body holds an .npz archive; send a single .npy array")
    return check_batch(arr, spec)


def check_batch(arr: np.ndarray, spec: InputSpec) -> np.ndarray:
    """(N, C, H, W) or (N, H, W, C) uint8 / float in [0, 1] -> float32 (N, C, H, W); shape, size,
    dtype and values checked against `spec`."""
    c, h, w = spec.input_size
    if arr.ndim != 4:
        hint = " (a single image? add a batch dimension)" if arr.ndim == 3 else ""
        raise RequestError(f"expected a batch of shape (N, {c}, {h}, {w}) or (N, {h}, {w}, {c}), got shape "
                           f"{tuple(arr.shape)}{hint}")
    if arr.shape[0] == 0:
        raise RequestError("empty batch (N = 0)")
    if arr.shape[0] > spec.max_images:
        raise RequestError(f"{arr.shape[0]} images in one request exceed the limit of {spec.max_images}", 413)
    if tuple(arr.shape[1:]) == (h, w, c) and tuple(arr.shape[1:]) != (c, h, w):
        arr = arr.transpose(0, 3, 1, 2)
    if tuple(arr.shape[1:]) != (c, h, w):
        raise RequestError(f"images of shape {tuple(arr.shape[1:])} do not fit the model's input {(c, h, w)} "
                           f"(C, H, W) or {(h, w, c)} (H, W, C)")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr, dtype=np.float32) / 255.0
    if arr.dtype.kind != "f":
        raise RequestError(f"pixel dtype {arr.dtype} is not supported: send uint8 (0..255) or float in [0, 1]")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(out).all():
        raise RequestError("the batch contains NaN/Inf values")
    lo, hi = float(out.min()), float(out.max())
    if lo < -RANGE_SLACK or hi > 1 + RANGE_SLACK:
        raise RequestError(f"float pixels must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}] (uint8 images: "
                           "send dtype uint8)")
    return out


def encode_npy(batch: np.ndarray) -> bytes:
    """The ``.npy`` bytes of `batch` (client side)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(batch), allow_pickle=False)
    return buf.getvalue()


__all__ = ["InputSpec", "RequestError", "check_batch", "decode_body", "decode_npy", "encode_npy"]
