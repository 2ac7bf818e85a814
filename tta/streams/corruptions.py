"""Batched, seedable image corruptions with the CIFAR-10-C generator's constants.

Reference: Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations", ICLR 2019 (the CIFAR-10-C generator). The constants per severity are those of
the CIFAR-10-C generator (hendrycks/robustness, ImageNet-C/create_c/make_cifar_c.py) and apply to small images (longest side <= 64 px; Fashion-MNIST is
converted to 32x32 RGB first). Larger images are delegated, one image at a time, to the maintained
`imagecorruptions` package (ImageNet-C constants).

Every corruption works on a whole uint8 NHWC batch at once:
- pointwise ones (noise, brightness, contrast, saturate, fog, frost) are numpy array expressions;
- fixed linear filters (defocus, zoom blur) are one dense (H*W x H*W) operator built once per
  (size, severity) and applied to the whole batch with a single matrix product;
- per-image random geometry (motion blur, elastic transform, snow) is a gather over the batch with
  per-image offsets/coordinates, looping only over kernel taps;
- glass blur's sequential local pixel moves loop over pixel positions (as the original), each step
  moving that position in every image of the batch at once;
- JPEG is the only per-image Python loop (the codec works on one image).
Two behaviours of the original code are reproduced on purpose: glass blur's "swap" is a copy (see
`glass_blur`), and zoom blur's zoom list starts at 1.0 (the clean image is counted twice).

Severities are continuous in [0, 5]: integers 1..5 are the CIFAR-10-C constants exactly; a fractional
severity interpolates every constant linearly between its two neighbouring integer severities, and
severity 0 is the clean image, with `CLEAN_PARAMS` as the constants the corruption tends to as it
vanishes (no noise, a blur of radius 0, image weight 1...). This is how CCC (Press et al., "RDumb",
NeurIPS 2023) makes ImageNet-C severities continuous; here it is applied to the CIFAR-10-C table.
Shot noise interpolates 1/c (the noise scale); defocus blur mixes its two neighbouring operators
(its constants trade a disk radius against an anti-aliasing blur, so interpolating them is not
monotone); glass blur's last, fractional pass moves each pixel with that probability; the other
integer constants (motion-blur radii, JPEG quality) are rounded. Fractional severities are rounded to
1/100 so the cached blur operators of a slowly moving severity are reused.
Random numbers come from one `numpy.random.Generator` seeded by `seed`, so a call is deterministic;
the random streams differ from the original code, the distributions do not. Results are clipped to
[0, 1] and stored as uint8 by truncation (x * 255), as the original generator did.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable
from functools import lru_cache

import cv2
import numpy as np
from scipy import ndimage

from tta.errors import ConfigError, DataNotFoundError, InvalidInputError
from tta.streams.names import CORRUPTIONS, EXTRA_CORRUPTIONS, SEVERITIES, STANDARD_ORDER  # noqa: F401

#: Images whose longest side is at most this use the CIFAR-10-C constants; larger ones ImageNet-C.
SMALL_IMAGE_MAX = 64

# CIFAR-10-C constants, severity 1..5 (hendrycks/robustness, ImageNet-C/create_c/make_cifar_c.py).
PARAMS: dict[str, tuple] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
    "zoom_blur": tuple(np.arange(1, hi, 0.01) for hi in (1.06, 1.11, 1.16, 1.21, 1.26)),
    "snow": (
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    ),
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    # (alpha, sigma, affine) as fractions of the image size
    "elastic_transform": ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
    "jpeg_compression": (80, 65, 58, 50, 40),
    "speckle_noise": (0.06, 0.1, 0.12, 0.16, 0.2),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1),
    "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),
}

#: The constants at severity 0: where each constant of `PARAMS` goes as the corruption vanishes.
#: Interpolating between this row and severity 1 gives severities in (0, 1); severity 0 itself
#: returns the clean image without calling the corruption.
CLEAN_PARAMS: dict[str, object] = {
    "gaussian_noise": 0.0,
    "shot_noise": float("inf"),  # interpolated as 1/c: 0 = no photon noise
    "impulse_noise": 0.0,
    "defocus_blur": (0.0, 0.0),
    "glass_blur": (0.0, 1, 0),
    "motion_blur": (0, 0.0),
    "zoom_blur": 1.01,  # the largest zoom factor (exclusive): np.arange(1, 1.01, 0.01) = [1.0]
    "snow": (0.1, 0.2, 1.0, 1.0, 8, 3.0, 1.0),
    "frost": (1.0, 0.0),
    "fog": (0.0, 3.0),
    "brightness": 0.0,
    "contrast": 1.0,
    "elastic_transform": (0.0, 0.0, 0.0),
    "pixelate": 1.0,
    "jpeg_compression": 100,
    "speckle_noise": 0.0,
    "gaussian_blur": 0.0,
    "saturate": (1.0, 0.0),
}
#: zoom blur's largest zoom factor (exclusive) per severity 1..5, the interpolated constant
ZOOM_MAX: tuple[float, ...] = (1.06, 1.11, 1.16, 1.21, 1.26)
#: positions of integer-valued constants (rounded after interpolation)
_INTEGER_FIELDS: dict[str, tuple[int, ...]] = {
    "glass_blur": (1,), "motion_blur": (0,), "snow": (4,), "jpeg_compression": (0,),
}

Array = np.ndarray


# ----------------------------------------------------------------------------------------------
# helpers


def _gaussian(x: Array, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> Array:
    """skimage.filters.gaussian over the spatial axes (1, 2) of an N,H,W[,C] batch."""
    if sigma == 0:
        return x
    sig = (0, sigma, sigma) + (0,) * (x.ndim - 3)
    return ndimage.gaussian_filter(x, sig, mode=mode, truncate=truncate)


def _apply_operator(x: Array, op: Array) -> Array:
    """Apply a dense spatial operator (H*W, H*W) to every channel of every image with one GEMM."""
    n, h, w, c = x.shape
    cols = x.reshape(n, h * w, c).transpose(1, 0, 2).reshape(h * w, n * c)
    out = op @ cols
    return out.reshape(h * w, n, c).transpose(1, 0, 2).reshape(n, h, w, c)


def _operator_from(fn: Callable[[Array], Array], h: int, w: int) -> Array:
    """The matrix of a linear spatial map `fn` ((B, h, w) -> (B, h, w)), probed with basis images."""
    basis = np.eye(h * w, dtype=np.float64).reshape(h * w, h, w)
    return np.ascontiguousarray(fn(basis).reshape(h * w, h * w).T).astype(np.float32)


def _zoom_axis(size: int, z: float) -> Array:
    """(size, size) matrix of the centre zoom along one axis: crop ceil(size/z) centre pixels, scale by z
    with linear interpolation (scipy.ndimage.zoom, order 1, grid_mode False), trim the centre `size`."""
    crop = int(np.ceil(size / z))
    top = (size - crop) // 2
    out_size = int(round(crop * z))
    # scipy.ndimage.zoom without grid_mode maps output i to input i * (in - 1) / (out - 1)
    src = np.arange(out_size) * ((crop - 1) / (out_size - 1) if out_size > 1 else 0.0)
    lo = np.clip(np.floor(src).astype(int), 0, crop - 1)
    hi = np.clip(lo + 1, 0, crop - 1)
    frac = src - lo
    m = np.zeros((out_size, size))
    rows = np.arange(out_size)
    np.add.at(m, (rows, top + lo), 1 - frac)
    np.add.at(m, (rows, top + hi), frac)
    trim = (out_size - size) // 2
    return m[trim : trim + size]


def _clipped_zoom(x: Array, z: float) -> Array:
    """Centre zoom of a (N, H, W[, C]) batch (the original `clipped_zoom`, separable)."""
    a = _zoom_axis(x.shape[1], z)
    b = _zoom_axis(x.shape[2], z)
    return np.einsum("ih,nhw...,jw->nij...", a, x, b, optimize=True).astype(x.dtype)


def _bilinear(x: Array, rows: Array, cols: Array, mode: str) -> Array:
    """Sample every image of x (N, H, W, C) at float coordinates rows/cols (N, H, W), bilinear.

    mode "mirror" reflects about the edge pixel (cv2 BORDER_REFLECT_101), "reflect" repeats the edge
    pixel in the reflection (scipy/skimage "reflect")."""
    n, h, w, _ = x.shape

    def fold(i: Array, size: int) -> Array:
        if size == 1:
            return np.zeros_like(i)
        if mode == "mirror":
            period = 2 * size - 2
            i = np.mod(i, period)
            return np.where(i >= size, period - i, i)
        period = 2 * size
        i = np.mod(i, period)
        return np.where(i >= size, period - 1 - i, i)

    r0 = np.floor(rows)
    c0 = np.floor(cols)
    fr = (rows - r0)[..., None].astype(np.float32)
    fc = (cols - c0)[..., None].astype(np.float32)
    r0 = r0.astype(np.int64)
    c0 = c0.astype(np.int64)
    # flat row indices into x viewed as (N*H*W, C): one 1-D gather per neighbour
    base = (np.arange(n) * (h * w))[:, None, None]
    ra, rb = fold(r0, h) * w + base, fold(r0 + 1, h) * w + base
    ca, cb = fold(c0, w), fold(c0 + 1, w)
    flat = x.reshape(n * h * w, -1)
    top = flat[ra + ca] * (1 - fc) + flat[ra + cb] * fc
    bottom = flat[rb + ca] * (1 - fc) + flat[rb + cb] * fc
    return top * (1 - fr) + bottom * fr


def _motion_blur(x: Array, radius: int, sigma: float, angles: Array) -> Array:
    """ImageMagick `-motion-blur radius x sigma + angle` on a batch (N, H, W, C), one angle per image.

    The kernel is one-sided: width = 2*radius + 1 taps with weights exp(-i^2 / (2 sigma^2)) (normalised),
    tap i reads the pixel at offset (round(i cos a), round(i sin a)) (ImageMagick's
    ceil(v - 0.5) rounding), with edge pixels repeated outside the image (ImageMagick's default
    virtual-pixel method)."""
    n, h, w, _ = x.shape
    width = 2 * radius + 1
    taps = np.arange(width)
    kernel = np.exp(-(taps.astype(np.float64) ** 2) / (2 * sigma**2))
    kernel /= kernel.sum()
    rad = np.deg2rad(angles)[:, None]
    dx = np.ceil(taps * np.cos(rad) - 0.5).astype(np.int64)  # (N, width)
    dy = np.ceil(taps * np.sin(rad) - 0.5).astype(np.int64)
    base = (np.arange(n) * (h * w))[:, None, None]
    flat = x.reshape(n * h * w, -1)
    out = np.zeros(x.shape, dtype=np.float32)
    for i in range(width):  # loop over kernel taps; each tap is one gather over the whole batch
        rows = np.clip(np.arange(h)[None, :] + dy[:, i : i + 1], 0, h - 1)
        cols = np.clip(np.arange(w)[None, :] + dx[:, i : i + 1], 0, w - 1)
        out += np.float32(kernel[i]) * flat[base + rows[:, :, None] * w + cols[:, None, :]]
    return out


def _plasma_fractal(n: int, mapsize: int, wibbledecay: float, rng: np.random.Generator) -> Array:
    """n diamond-square height maps (n, mapsize, mapsize), each normalised to [0, 1]."""
    maps = np.zeros((n, mapsize, mapsize), dtype=np.float64)
    step = mapsize
    wibble = 100.0

    def wibbled(a: Array) -> Array:
        return a / 4 + wibble * rng.uniform(-wibble, wibble, a.shape)

    while step >= 2:
        half = step // 2
        corners = maps[:, 0:mapsize:step, 0:mapsize:step]
        square = corners + np.roll(corners, -1, axis=1)
        square += np.roll(square, -1, axis=2)
        maps[:, half:mapsize:step, half:mapsize:step] = wibbled(square)
        centres = maps[:, half:mapsize:step, half:mapsize:step]
        corners = maps[:, 0:mapsize:step, 0:mapsize:step]
        left = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=2)
        maps[:, 0:mapsize:step, half:mapsize:step] = wibbled(left)
        top = centres + np.roll(centres, 1, axis=2) + corners + np.roll(corners, -1, axis=1)
        maps[:, half:mapsize:step, 0:mapsize:step] = wibbled(top)
        step //= 2
        wibble /= wibbledecay
    maps -= maps.min(axis=(1, 2), keepdims=True)
    maps /= maps.max(axis=(1, 2), keepdims=True)
    return maps


def _gray(x: Array) -> Array:
    """cv2 RGB2GRAY weights, keepdims."""
    return (x[..., 0:1] * 0.299 + x[..., 1:2] * 0.587 + x[..., 2:3] * 0.114).astype(x.dtype)


@lru_cache(maxsize=8)
def _pil_box_weights(in_size: int, out_size: int) -> Array:
    """The (out, in) coefficient matrix of PIL's BOX resampling filter along one axis."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    m = np.zeros((out_size, in_size))
    for o in range(out_size):  # once per size pair (cached), not per image
        centre = (o + 0.5) * scale
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), in_size)
        t = (np.arange(lo, hi) - centre + 0.5) / filterscale
        wts = ((t > -0.5) & (t <= 0.5)).astype(np.float64)
        m[o, lo:hi] = wts / wts.sum()
    return m


def _pil_box_resize(x: Array, out_h: int, out_w: int) -> Array:
    """PIL `Image.resize(..., BOX)` on a uint8 batch: horizontal pass, round, vertical pass, round."""
    wh = _pil_box_weights(x.shape[2], out_w).astype(np.float32)
    wv = _pil_box_weights(x.shape[1], out_h).astype(np.float32)
    t = x.astype(np.float32).transpose(0, 1, 3, 2)  # (N, H, C, W)
    t = np.floor(t @ wh.T + 0.5).transpose(0, 2, 3, 1)  # (N, C, out_w, H)
    t = np.floor(t @ wv.T + 0.5)  # (N, C, out_w, out_h)
    return np.clip(t.transpose(0, 3, 2, 1), 0, 255).astype(np.uint8)


@lru_cache(maxsize=2)
def _frost_textures() -> tuple[Array, ...]:
    """The five frost photographs used by CIFAR-10-C (frost1..frost5), RGB float in [0, 255], scaled
    by 0.2 (cv2 bilinear), loaded from the installed `imagecorruptions` package."""
    try:
        root = importlib.resources.files("imagecorruptions") / "frost"
    except ModuleNotFoundError as exc:
        raise DataNotFoundError(
            "frost needs the frost texture images of the `imagecorruptions` package; install it with "
            "`pip install imagecorruptions-imaug`"
        ) from exc
    names = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")
    out = []
    for name in names:
        with importlib.resources.as_file(root / name) as path:
            img = cv2.imread(str(path))
        if img is None:
            raise DataNotFoundError(f"frost texture {root / name} is missing or unreadable (imagecorruptions install)")
        img = cv2.resize(img, (0, 0), fx=0.2, fy=0.2)
        out.append(img[..., ::-1].astype(np.float32))
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# the corruptions: f(x float32 (N,H,W,3) in [0,1], params, rng) -> float array in [0,1] scale


def gaussian_noise(x: Array, std: float, rng: np.random.Generator) -> Array:
    return x + std * rng.standard_normal(x.shape, dtype=np.float32)


def shot_noise(x: Array, c: float, rng: np.random.Generator) -> Array:
    return (rng.poisson(x.astype(np.float64) * c) / c).astype(np.float32)


def impulse_noise(x: Array, amount: float, rng: np.random.Generator) -> Array:
    """Salt & pepper per pixel and channel (skimage random_noise 's&p', salt_vs_pepper 0.5)."""
    flipped = rng.random(x.shape) < amount
    salted = rng.random(x.shape) < 0.5
    out = x.copy()
    out[flipped & salted] = 1.0
    out[flipped & ~salted] = 0.0
    return out


def speckle_noise(x: Array, c: float, rng: np.random.Generator) -> Array:
    return x + x * (c * rng.standard_normal(x.shape, dtype=np.float32))


def gaussian_blur(x: Array, sigma: float, rng: np.random.Generator) -> Array:
    return _gaussian(x, sigma)


@lru_cache(maxsize=32)
def _defocus_operator(h: int, w: int, radius: float, alias_blur: float) -> Array:
    if radius <= 8:
        grid, ksize = np.arange(-8, 9), (3, 3)
    else:
        grid, ksize = np.arange(-radius, radius + 1), (5, 5)
    xx, yy = np.meshgrid(grid, grid)
    disk = ((xx**2 + yy**2) <= radius**2).astype(np.float32)
    disk /= disk.sum()
    kernel = cv2.GaussianBlur(disk, ksize=ksize, sigmaX=alias_blur)

    def filt(b: Array) -> Array:  # cv2.filter2D (BORDER_REFLECT_101) on probe images, built once
        return np.stack([cv2.filter2D(img.astype(np.float32), -1, kernel) for img in b])

    return _operator_from(filt, h, w)


def defocus_blur(x: Array, c: tuple, rng: np.random.Generator) -> Array:
    """`c` = (radius, alias_blur), or for a fractional severity ((radius, alias_blur, weight), ...): the
    weighted sum of the neighbouring severities' operators (radius 0 = the identity). Interpolating the
    two constants instead would not be monotone: severities 1..3 blur through alias_blur alone, 4..5
    through the disk, and a radius below 1 is a single pixel whatever its value."""
    h, w = x.shape[1], x.shape[2]
    if not isinstance(c[0], tuple):
        return _apply_operator(x, _defocus_operator(h, w, *c))
    op = sum(wt * (np.eye(h * w, dtype=np.float32) if r == 0 else _defocus_operator(h, w, r, a)) for r, a, wt in c)
    return _apply_operator(x, op.astype(np.float32))


def glass_blur(x: Array, c: tuple[float, int, int], rng: np.random.Generator) -> Array:
    """Blur, local pixel "swaps" in scan order from the bottom-right, blur again.

    The original code writes the swap as ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` on an (H, W, 3)
    array, where both sides are numpy views: the first assignment overwrites the pixel that the second
    then copies back, so the effect is a copy ``x[h, w] = x[h', w']`` (pixels are dragged up-left, not
    exchanged). CIFAR-10-C was generated that way, so this reproduces the copy. The scan is sequential
    (a moved pixel can move again); each position is processed for every image of the batch at once.
    A fractional number of passes (fractional severities) makes the last pass move each pixel with
    probability equal to the fraction, so the strength grows continuously with the severity."""
    sigma, delta, iterations = c
    n, h, w, _ = x.shape
    img = np.floor(_gaussian(x, sigma) * 255).clip(0, 255).astype(np.uint8)
    nn = np.arange(n)
    for k in range(int(np.ceil(iterations))):
        p = min(1.0, iterations - k)
        for r in range(h - delta, delta, -1):
            offsets = rng.integers(-delta, delta, size=(w, n, 2))
            moves = rng.random((w, n)) < p if p < 1 else None
            for col in range(w - delta, delta, -1):
                dx, dy = offsets[col, :, 0], offsets[col, :, 1]
                if moves is None:
                    img[nn, r, col] = img[nn, r + dy, col + dx]
                else:
                    img[nn, r, col] = np.where(moves[col, :, None], img[nn, r + dy, col + dx], img[nn, r, col])
    return _gaussian(img.astype(np.float32) / 255, sigma)


def motion_blur(x: Array, c: tuple[int, float], rng: np.random.Generator) -> Array:
    angles = rng.uniform(-45, 45, x.shape[0])
    out = _motion_blur(x, c[0], c[1], angles)
    return np.round(np.clip(out, 0, 1) * 255) / 255  # ImageMagick returns 8-bit pixels


@lru_cache(maxsize=32)
def _zoom_blur_operator(h: int, w: int, zooms: tuple[float, ...]) -> Array:
    op = np.eye(h * w)
    for z in zooms:
        op += np.kron(_zoom_axis(h, z), _zoom_axis(w, z))
    return (op / (len(zooms) + 1)).astype(np.float32)


def zoom_blur(x: Array, zooms: tuple[float, ...], rng: np.random.Generator) -> Array:
    return _apply_operator(x, _zoom_blur_operator(x.shape[1], x.shape[2], zooms))


def snow(x: Array, c: tuple, rng: np.random.Generator) -> Array:
    mean, std, zoom, threshold, radius, sigma, blend = c
    n, h, w, _ = x.shape
    layer = rng.normal(mean, std, (n, h, w))
    layer = _clipped_zoom(layer, zoom)
    layer[layer < threshold] = 0
    layer = np.floor(np.clip(layer, 0, 1) * 255) / 255  # PIL 'L' image of the layer
    angles = rng.uniform(-135, -45, n)
    layer = _motion_blur(layer[..., None].astype(np.float32), radius, sigma, angles)
    layer = np.round(np.clip(layer, 0, 1) * 255).astype(np.float32) / 255
    x = blend * x + (1 - blend) * np.maximum(x, _gray(x) * 1.5 + 0.5)
    return x + layer + layer[:, ::-1, ::-1]


def frost(x: Array, c: tuple[float, float], rng: np.random.Generator) -> Array:
    """w1 * x + w2 * frost crop; the texture is one of frost1..5 (the original draws randint(5))."""
    n, h, w, _ = x.shape
    textures = _frost_textures()
    which = rng.integers(0, len(textures), n)
    layer = np.empty(x.shape, dtype=np.float32)
    for t, tex in enumerate(textures):  # loop over the five textures, gather all their images at once
        idx = np.nonzero(which == t)[0]
        if idx.size == 0:
            continue
        if tex.shape[0] <= h or tex.shape[1] <= w:
            f = 1.1 * max(h / tex.shape[0], w / tex.shape[1])
            tex = cv2.resize(tex, (0, 0), fx=f, fy=f, interpolation=cv2.INTER_CUBIC)
        r0 = rng.integers(0, tex.shape[0] - h, idx.size)
        c0 = rng.integers(0, tex.shape[1] - w, idx.size)
        rows = r0[:, None] + np.arange(h)
        cols = c0[:, None] + np.arange(w)
        layer[idx] = tex[rows[:, :, None], cols[:, None, :]]
    return c[0] * x + c[1] * layer / 255


def fog(x: Array, c: tuple[float, float], rng: np.random.Generator) -> Array:
    n, h, w, _ = x.shape
    mapsize = 1 << (max(h, w) - 1).bit_length()  # next power of two (32 for CIFAR)
    max_val = x.max(axis=(1, 2, 3), keepdims=True)
    plasma = _plasma_fractal(n, mapsize, c[1], rng)[:, :h, :w, None].astype(np.float32)
    return (x + c[0] * plasma) * max_val / (max_val + c[0])


def brightness(x: Array, c: float, rng: np.random.Generator) -> Array:
    """V + c in HSV. With H and S fixed, every RGB channel scales by V'/V (black pixels become grey V'),
    which is exactly the skimage rgb2hsv -> hsv2rgb round trip without computing hue."""
    v = x.max(axis=-1, keepdims=True)
    v_new = np.clip(v + c, 0, 1)
    return np.where(v > 0, x * (v_new / np.where(v > 0, v, 1)), v_new)


def contrast(x: Array, c: float, rng: np.random.Generator) -> Array:
    means = x.mean(axis=(1, 2), keepdims=True)
    return (x - means) * c + means


def saturate(x: Array, c: tuple[float, float], rng: np.random.Generator) -> Array:
    """S * mult + add in HSV with H and V fixed: channel' = V - (V - channel) * S'/S. Grey pixels (S = 0)
    have hue 0 (red) in skimage, so they become (V, V(1-S'), V(1-S')), as in the original."""
    mult, add = c
    v = x.max(axis=-1, keepdims=True)
    mn = x.min(axis=-1, keepdims=True)
    s = np.where(v > 0, (v - mn) / np.where(v > 0, v, 1), 0)
    s_new = np.clip(s * mult + add, 0, 1)
    coloured = v - (v - x) * (s_new / np.where(s > 0, s, 1))
    grey = np.concatenate([v, v * (1 - s_new), v * (1 - s_new)], axis=-1)
    return np.where(s > 0, coloured, grey)


def elastic_transform(x: Array, c: tuple[float, float, float], rng: np.random.Generator) -> Array:
    """Random affine (three points around the centre moved by up to `affine` px; cv2.warpAffine,
    BORDER_REFLECT_101), then a smooth random displacement field (alpha, sigma), reflect mode."""
    n, h, w, _ = x.shape
    size = h  # the constants are fractions of the (square) CIFAR image size
    alpha, sigma, affine = (v * size for v in c)
    cy, cx = h // 2, w // 2
    sq = min(h, w) // 3
    src = np.array([[cx + sq, cy + sq], [cx + sq, cy - sq], [cx - sq, cy - sq]], dtype=np.float64)
    dst = src[None] + rng.uniform(-affine, affine, (n, 3, 2))
    # affine M (2x3) with M @ [src, 1] = dst, for all images at once
    p = np.concatenate([src, np.ones((3, 1))], axis=1)
    m = np.linalg.solve(p[None], dst).transpose(0, 2, 1)  # (N, 2, 3)
    a_inv = np.linalg.inv(m[:, :, :2])
    t_inv = -np.einsum("nij,nj->ni", a_inv, m[:, :, 2])
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    src_x = a_inv[:, 0, 0, None, None] * xx + a_inv[:, 0, 1, None, None] * yy + t_inv[:, 0, None, None]
    src_y = a_inv[:, 1, 0, None, None] * xx + a_inv[:, 1, 1, None, None] * yy + t_inv[:, 1, None, None]
    warped = _bilinear(x, src_y, src_x, mode="mirror")
    dx = _gaussian(rng.uniform(-1, 1, (n, h, w)), sigma, mode="reflect", truncate=3) * alpha
    dy = _gaussian(rng.uniform(-1, 1, (n, h, w)), sigma, mode="reflect", truncate=3) * alpha
    return _bilinear(warped, yy + dy, xx + dx, mode="reflect")


def pixelate(x: Array, c: float, rng: np.random.Generator) -> Array:
    n, h, w, _ = x.shape
    img = np.round(x * 255).astype(np.uint8)
    small = _pil_box_resize(img, int(h * c), int(w * c))
    return _pil_box_resize(small, h, w).astype(np.float32) / 255


def jpeg_compression(x: Array, quality: int, rng: np.random.Generator) -> Array:
    """JPEG round trip (libjpeg via OpenCV; bit-identical to the original's PIL save/open at these
    qualities, see tests, and about 3x faster). A Python loop over images: the codec takes one image."""
    img = np.round(x * 255).astype(np.uint8)[..., ::-1]  # OpenCV codecs take BGR
    out = np.empty(img.shape, dtype=np.uint8)
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    for i in range(img.shape[0]):
        ok, buf = cv2.imencode(".jpg", img[i], params)
        if not ok:  # pragma: no cover - encoding an in-memory uint8 image does not fail
            raise InvalidInputError(f"JPEG encoding of image {i} failed")
        out[i] = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    return out[..., ::-1].astype(np.float32) / 255


_FUNCS: dict[str, Callable[[Array, object, np.random.Generator], Array]] = {
    "gaussian_noise": gaussian_noise, "shot_noise": shot_noise, "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur, "glass_blur": glass_blur, "motion_blur": motion_blur,
    "zoom_blur": zoom_blur, "snow": snow, "frost": frost, "fog": fog, "brightness": brightness, "contrast": contrast,
    "elastic_transform": elastic_transform, "pixelate": pixelate, "jpeg_compression": jpeg_compression,
    "speckle_noise": speckle_noise, "gaussian_blur": gaussian_blur, "saturate": saturate,
}


# ----------------------------------------------------------------------------------------------
# public entry point


def _check_severity(severity: object) -> float:
    """A severity in [0, 5] (int or float; fractional values rounded to 1/100)."""
    if isinstance(severity, (bool, np.bool_)) or not isinstance(severity, (int, float, np.integer, np.floating)):
        raise ConfigError(f"severity must be a number in 0..5, got {severity!r}")
    value = float(severity)
    if not 0.0 <= value <= 5.0:  # also rejects NaN
        raise ConfigError(f"severity must be a number in 0..5, got {severity!r}")
    return round(value, 2)


def _validate(images: Array, name: str, severity: object) -> float:
    if name not in CORRUPTIONS:
        raise ConfigError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    value = _check_severity(severity)
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise InvalidInputError(f"images must be a uint8 numpy array (N, H, W, 3), got {type(images).__name__} "
                                f"{getattr(images, 'dtype', '')}")
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] < 8 or images.shape[2] < 8:
        raise InvalidInputError(f"images must have shape (N, H, W, 3) with H, W >= 8, got {images.shape}")
    return value


def _row(name: str, severity: int) -> object:
    """The constants of integer severity 0..5 in interpolation space."""
    if name == "zoom_blur":
        return CLEAN_PARAMS[name] if severity == 0 else ZOOM_MAX[severity - 1]
    row = CLEAN_PARAMS[name] if severity == 0 else PARAMS[name][severity - 1]
    if name == "shot_noise":
        return 1.0 / row  # interpolate the noise scale 1/c (1/inf = 0 at severity 0)
    return row


def corruption_params(name: str, severity: float) -> object:
    """The constants `corrupt` uses for `name` at `severity` in (0, 5].

    Integer severities return the CIFAR-10-C constants unchanged; fractional ones interpolate
    linearly between the neighbouring integer severities (severity 0 = `CLEAN_PARAMS`), except
    defocus blur, whose two neighbouring operators are mixed (see `defocus_blur`). Zoom blur's
    constant is its tuple of zoom factors; glass blur's number of passes may be fractional."""
    if name not in CORRUPTIONS:
        raise ConfigError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    value = _check_severity(severity)
    if value == 0:
        raise ConfigError(f"severity 0 is the clean image: {name} has no constants there")
    lo = int(np.floor(value))
    frac = value - lo
    if frac == 0:
        if name == "zoom_blur":
            return tuple(float(z) for z in PARAMS[name][lo - 1])
        return PARAMS[name][lo - 1]
    a, b = _row(name, lo), _row(name, lo + 1)
    if name == "defocus_blur":  # a weighted sum of the two operators (see `defocus_blur`)
        return ((*a, 1 - frac), (*b, frac))
    if isinstance(a, tuple):
        mixed: object = tuple((1 - frac) * u + frac * v for u, v in zip(a, b))
    else:
        mixed = (1 - frac) * a + frac * b
    if name == "zoom_blur":
        return tuple(float(z) for z in np.arange(1, mixed, 0.01))
    if name == "shot_noise":
        return 1.0 / mixed
    ints = _INTEGER_FIELDS.get(name)
    if ints is not None:
        if isinstance(mixed, tuple):
            mixed = tuple(int(np.floor(v + 0.5)) if i in ints else v for i, v in enumerate(mixed))
        else:
            mixed = int(np.floor(mixed + 0.5))
    return mixed


def _delegate_imagenet_c(images: Array, name: str, severity: int, rng: np.random.Generator) -> Array:
    """Per-image `imagecorruptions.corrupt` (ImageNet-C constants) with the global numpy RNG seeded from
    `rng` for each image (that package draws from np.random); the global state is restored after."""
    try:
        import imagecorruptions
    except ImportError as exc:  # pragma: no cover - dependency declared in pyproject
        raise ConfigError("images larger than 64 px use the ImageNet-C constants of the `imagecorruptions` "
                          "package: pip install imagecorruptions-imaug") from exc
    seeds = rng.integers(0, 2**31 - 1, images.shape[0])
    state = np.random.get_state()
    out = np.empty_like(images)
    try:
        for i, s in enumerate(seeds):
            np.random.seed(int(s))
            kwargs = {"seed": int(s)} if name in ("glass_blur", "impulse_noise") else {}
            out[i] = imagecorruptions.corrupt(images[i], severity=severity, corruption_name=name, **kwargs)
    finally:
        np.random.set_state(state)
    return out


def corrupt(images: Array, name: str, severity: float, seed: int | np.random.SeedSequence | None = None) -> Array:
    """Corrupt a uint8 batch (N, H, W, 3) with corruption `name` at `severity` (0..5).

    Returns a new uint8 array of the same shape. `seed` (int or SeedSequence) makes the call
    deterministic; None draws fresh entropy. Images up to 64 px use the CIFAR-10-C constants
    (batched, this module), at any severity in [0, 5] (fractional ones interpolated, 0 = clean);
    larger images the ImageNet-C constants (per image, `imagecorruptions`, integer severities).
    """
    value = _validate(images, name, severity)
    rng = np.random.default_rng(seed)
    if images.shape[0] == 0 or value == 0:
        return images.copy()
    if max(images.shape[1], images.shape[2]) > SMALL_IMAGE_MAX:
        if value != int(value):
            raise ConfigError(f"fractional severity {severity} needs images of at most {SMALL_IMAGE_MAX} px "
                              "(the ImageNet-C constants are applied per integer severity)")
        return _delegate_imagenet_c(images, name, int(value), rng)
    x = images.astype(np.float32) / 255
    out = _FUNCS[name](x, corruption_params(name, value), rng)
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)
