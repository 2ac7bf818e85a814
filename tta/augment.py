"""CoTTA's test-time augmentations, batched over views.

The augmentation of CoTTA (Wang et al., CVPR 2022) draws ONE set of random parameters per pass
("view") and applies it to the whole batch; only the additive noise is drawn per pixel:

    clip(0, 1) -> colour jitter in a random order (brightness [0.6, 1.4], contrast [0.7, 1.3],
    saturation [0.5, 1.5], hue [-0.06, 0.06], gamma [0.7, 1.3]) -> pad n/2 (edge) -> random affine
    (rotation +-15 deg, translation up to 1/16 of the padded side, rounded to whole pixels as
    torchvision does, scale [0.9, 1.1], bilinear) -> gaussian blur (kernel 5, sigma [0.001, 0.5])
    -> centre crop back to n -> horizontal flip (p = 0.5) -> gaussian noise (std 0.005) -> clip(0, 1)

Here the parameters of all N views are drawn at once (`CottaAugment.draw`) and `apply` runs any
number of views as one batched computation on a (V, B, C, H, W) tensor. The geometric part is
fused: edge padding followed by an affine warp and a centre crop equals sampling the original
image at the warped coordinates with ``padding_mode="border"`` (an edge-padded image holds the
border value everywhere outside the original), so only the (n + 4)^2 region the blur needs is
sampled instead of the (2n)^2 padded image. The blur is a separable 5-tap filter written as five
shifted multiply-adds with per-view weights.

Randomness is reproducible by construction: parameters for all views are drawn first, then the
noise of each view is drawn in view order (`noise`), so applying the views one at a time (the
reference algorithm) or in chunks consumes a CPU generator identically.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tta.errors import InvalidInputError

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale
N_COLOR_OPS = 5  # brightness, contrast, saturation, hue, gamma
BLUR_TAPS = 5


@dataclass(frozen=True)
class AugmentRanges:
    """Parameter ranges of the CoTTA augmentation (defaults: CIFAR/ImageNet reference code)."""

    brightness: tuple[float, float] = (0.6, 1.4)
    contrast: tuple[float, float] = (0.7, 1.3)
    saturation: tuple[float, float] = (0.5, 1.5)
    hue: tuple[float, float] = (-0.06, 0.06)
    gamma: tuple[float, float] = (0.7, 1.3)
    rotation_deg: float = 15.0
    translate: float = 1.0 / 16.0
    scale: tuple[float, float] = (0.9, 1.1)
    blur_sigma: tuple[float, float] = (0.001, 0.5)
    flip_p: float = 0.5
    noise_std: float = 0.005


@dataclass
class AugmentParams:
    """Per-view parameters of V views; every tensor has V rows (CPU: they index views on the host)."""

    factors: torch.Tensor  # (V, 5): brightness, contrast, saturation, hue, gamma
    order: torch.Tensor  # (V, 5) int64: permutation of the colour ops per view
    angle: torch.Tensor  # (V,) radians
    shift: torch.Tensor  # (V, 2) pixels (x, y), whole numbers
    scale: torch.Tensor  # (V,)
    blur: torch.Tensor  # (V, 5) normalised blur taps
    flip: torch.Tensor  # (V,) bool

    def __len__(self) -> int:
        return int(self.factors.shape[0])

    def views(self, start: int, stop: int) -> "AugmentParams":
        return AugmentParams(*(getattr(self, f)[start:stop] for f in self.__dataclass_fields__))


class CottaAugment:
    """Batched CoTTA augmentation. `draw` the parameters of N views, then `apply` them.

    `apply(x, params, noise)` returns (V, B, C, H, W) for x of shape (B, C, H, W); pass
    ``noise=None`` to skip the additive noise (tests).
    """

    def __init__(self, ranges: AugmentRanges | None = None) -> None:
        self.ranges = ranges or AugmentRanges()

    # ------------------------------------------------------------------ randomness
    def draw(self, n_views: int, image_size: tuple[int, int], generator: torch.Generator) -> AugmentParams:
        """Parameters of `n_views` views from one draw on the CPU `generator` (a few scalars)."""
        r = self.ranges
        dev = generator.device
        if dev.type != "cpu":
            raise ValueError("augmentation parameters are drawn on a CPU generator (they index views on the host)")
        u = torch.rand(n_views, 11, generator=generator, device=dev)
        order = torch.argsort(torch.rand(n_views, N_COLOR_OPS, generator=generator, device=dev), dim=1)
        lows = torch.tensor([r.brightness[0], r.contrast[0], r.saturation[0], r.hue[0], r.gamma[0]], device=dev)
        highs = torch.tensor([r.brightness[1], r.contrast[1], r.saturation[1], r.hue[1], r.gamma[1]], device=dev)
        factors = lows + (highs - lows) * u[:, :5]
        angle = torch.deg2rad((2 * u[:, 5] - 1) * r.rotation_deg)
        h, w = image_size
        padded = torch.tensor([2 * w, 2 * h], device=dev, dtype=u.dtype)  # pad n/2 on each side
        shift = torch.round((2 * u[:, 6:8] - 1) * r.translate * padded)
        scale = r.scale[0] + (r.scale[1] - r.scale[0]) * u[:, 8]
        sigma = r.blur_sigma[0] + (r.blur_sigma[1] - r.blur_sigma[0]) * u[:, 9]
        taps = torch.arange(BLUR_TAPS, device=dev, dtype=u.dtype) - BLUR_TAPS // 2
        blur = torch.exp(-(taps**2) / (2 * sigma[:, None] ** 2))
        blur = blur / blur.sum(1, keepdim=True)
        flip = u[:, 10] < r.flip_p
        return AugmentParams(factors, order, angle, shift, scale, blur, flip)

    def noise(self, n_views: int, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Per-pixel noise of `n_views` consecutive views: (V, B, C, H, W)."""
        return torch.randn(
            (n_views, *x.shape), generator=generator, device=generator.device, dtype=x.dtype
        ).mul_(self.ranges.noise_std).to(x.device)

    # ------------------------------------------------------------------ application
    def apply(self, x: torch.Tensor, params: AugmentParams, noise: torch.Tensor | None,
              grey_rgb: bool | None = None) -> torch.Tensor:
        """Augment batch `x` (B, C, H, W) with each of the V views in `params`: (V, B, C, H, W).

        `grey_rgb`: whether x is a grey RGB batch (`is_grey_rgb`; None = check here). Callers that
        augment the same batch in several chunks check once; False always runs the literal
        three-channel transform (reference_mode)."""
        if x.dim() != 4:
            raise InvalidInputError(f"augment: expected (B, C, H, W), got shape {tuple(x.shape)}")
        # Grey RGB images (R = G = B, e.g. Fashion-MNIST as RGB) stay grey through every op before
        # the noise: hue is an identity on them, contrast and saturation use their luma, the other
        # ops act on each channel alike. So such a batch is transformed as one channel standing for
        # all three (luma computed as from three equal channels) and expanded before the
        # per-channel noise: the values of the three-channel transform, a third of the work.
        if grey_rgb is None:
            grey_rgb = is_grey_rgb(x)
        if grey_rgb:
            views = self._transform(x[:, :1], params, replicated_rgb=True).expand(-1, -1, 3, -1, -1)
        else:
            views = self._transform(x, params)
        if noise is None:
            return views.clamp(0, 1)
        return (views + noise).clamp_(0, 1)

    def _transform(self, x: torch.Tensor, params: AugmentParams, replicated_rgb: bool = False) -> torch.Tensor:
        """Everything but the noise and the final clip: colour jitter, warp + blur + crop, flip.
        `replicated_rgb`: x has one channel standing for three equal RGB channels."""
        v = len(params)
        views = x.clamp(0, 1).unsqueeze(0).expand(v, *x.shape)
        views = self._color_jitter(views, params, replicated_rgb)
        p = _to(params, x)
        views = self._geometry(views, p)
        return torch.where(p.flip.view(v, 1, 1, 1, 1), views.flip(-1), views)

    def _color_jitter(self, views: torch.Tensor, params: AugmentParams, replicated_rgb: bool) -> torch.Tensor:
        """The 5 colour ops in each view's own order: at stage k, view i runs op order[i, k].

        Views are grouped by the op they run at each stage (host-side indices: the parameters live
        on the CPU), so every op is computed once per view, batched over the views that run it.
        """
        v, c = views.shape[0], views.shape[2]
        order = params.order.tolist()
        factors = params.factors.to(device=views.device, dtype=views.dtype)
        ops = _REPLICATED_RGB_OPS if replicated_rgb else _COLOR_OPS
        # identities: saturation and hue on true one-channel images, hue on grey RGB ones
        skipped = {3} if replicated_rgb else ({2, 3} if c != 3 else set())
        for stage in range(N_COLOR_OPS):
            groups: dict[int, list[int]] = {}
            for i in range(v):
                groups.setdefault(order[i][stage], []).append(i)
            if len(groups) == 1:
                ((op, idx),) = groups.items()
                if op not in skipped:
                    views = ops[op](views, factors[idx, op].view(-1, 1, 1, 1, 1))
                continue
            out = torch.empty(views.shape, device=views.device, dtype=views.dtype)
            for op, idx in groups.items():
                index = torch.tensor(idx, device=views.device)
                src = views.index_select(0, index)
                res = src if op in skipped else ops[op](src, factors[idx, op].view(-1, 1, 1, 1, 1))
                out.index_copy_(0, index, res)
            views = out
        return views

    def _geometry(self, views: torch.Tensor, p: AugmentParams) -> torch.Tensor:
        """Pad (edge) -> affine -> gaussian blur -> centre crop, fused (see the module docstring)."""
        v, b, c, h, w = views.shape
        m = BLUR_TAPS // 2
        sx, sy = _source_coords(p, h, w, m, views)
        grid = torch.stack((sx / (w / 2), sy / (h / 2)), dim=-1)  # align_corners=False normalisation
        # One grid per view: the batch and channels of a view ride along as channels.
        warped = F.grid_sample(
            views.reshape(v, b * c, h, w), grid, mode="bilinear", padding_mode="border", align_corners=False
        )
        # Separable blur as two depthwise convolutions with per-view taps.
        taps = p.blur.repeat_interleave(b * c, dim=0)
        flat = warped.reshape(1, v * b * c, h + 2 * m, w + 2 * m)
        flat = F.conv2d(flat, taps.view(-1, 1, BLUR_TAPS, 1), groups=v * b * c)
        flat = F.conv2d(flat, taps.view(-1, 1, 1, BLUR_TAPS), groups=v * b * c)
        return flat.view(v, b, c, h, w)


class ReflectAugment(CottaAugment):
    """The augmentation set without CoTTA's blur and noise, padded by reflection: the views of
    ROID's consistency loss (the reference's ``get_tta_transforms(padding_mode="reflect",
    cotta_augs=False)`` in mariodoebler/test-time-adaptation):

        clip(0, 1) -> colour jitter in a random order (CoTTA's ranges) -> pad n/2 (reflect) ->
        random affine (CoTTA's ranges, bilinear) -> centre crop back to n -> horizontal flip
        (p = 0.5) -> clip(0, 1)

    Same parameter draw as `CottaAugment` (the blur taps are drawn and ignored). Reflect padding
    followed by a bilinear warp equals sampling the original image at coordinates reflected about
    its outer pixel centres, which is ``grid_sample``'s ``reflection`` mode with ``align_corners``
    normalisation; the warp never reaches past the n/2 padding for these ranges, so the affine's
    zero fill plays no part. Use ``apply(x, params, None)`` (no noise).
    """

    def _geometry(self, views: torch.Tensor, p: AugmentParams) -> torch.Tensor:
        v, b, c, h, w = views.shape
        sx, sy = _source_coords(p, h, w, 0, views)
        # centred pixel units -> pixel indices -> align_corners=True normalisation (pixel centres at +-1)
        gx = (sx + (w - 1) / 2) * (2 / max(w - 1, 1)) - 1
        gy = (sy + (h - 1) / 2) * (2 / max(h - 1, 1)) - 1
        warped = F.grid_sample(
            views.reshape(v, b * c, h, w), torch.stack((gx, gy), dim=-1), mode="bilinear",
            padding_mode="reflection", align_corners=True,
        )
        return warped.view(v, b, c, h, w)


def _source_coords(p: AugmentParams, h: int, w: int, margin: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Source coordinates (centred pixel units) of the output pixel centres of the centre crop plus
    `margin` pixels on each side, for each view: source = R(-angle) (out - shift) / scale."""
    v = len(p)
    ys = torch.arange(-margin, h + margin, device=like.device, dtype=like.dtype) + 0.5 - h / 2
    xs = torch.arange(-margin, w + margin, device=like.device, dtype=like.dtype) + 0.5 - w / 2
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    cos, sin = torch.cos(p.angle).view(v, 1, 1), torch.sin(p.angle).view(v, 1, 1)
    ox = gx - p.shift[:, 0].view(v, 1, 1)
    oy = gy - p.shift[:, 1].view(v, 1, 1)
    inv = (1.0 / p.scale).view(v, 1, 1)
    return (cos * ox + sin * oy) * inv, (-sin * ox + cos * oy) * inv


def is_grey_rgb(x: torch.Tensor) -> bool:
    """Whether the (B, 3, H, W) batch `x` has R = G = B in every pixel."""
    return x.shape[1] == 3 and bool((x[:, 0] == x[:, 1]).all() and (x[:, 1] == x[:, 2]).all())


def _to(p: AugmentParams, x: torch.Tensor) -> AugmentParams:
    def cast(t: torch.Tensor) -> torch.Tensor:
        t = t.to(x.device)
        return t.to(x.dtype) if t.is_floating_point() else t

    return AugmentParams(*(cast(getattr(p, f)) for f in p.__dataclass_fields__))


def _grey(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-3] != 3:
        return x.mean(-3, keepdim=True)
    r, g, b = x.unbind(-3)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(-3)


def _luma_replicated(x: torch.Tensor) -> torch.Tensor:
    """`_grey` of an RGB image whose three channels all equal the one channel of `x` (same
    arithmetic as the three-channel formula, so the same values)."""
    return GRAY_WEIGHTS[0] * x + GRAY_WEIGHTS[1] * x + GRAY_WEIGHTS[2] * x


def _contrast_replicated(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    mean = _luma_replicated(x).mean(dim=(-3, -2, -1), keepdim=True)
    return torch.lerp(mean.expand_as(x), x, f).clamp_(0, 1)


def _saturation_replicated(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return torch.lerp(_luma_replicated(x), x, f).clamp_(0, 1)


def _brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return torch.mul(x, f).clamp_(0, 1)


def _contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    mean = _grey(x).mean(dim=(-3, -2, -1), keepdim=True)  # per image, as torchvision
    return torch.lerp(mean.expand_as(x), x, f).clamp_(0, 1)  # f * x + (1 - f) * mean


def _saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return torch.lerp(_grey(x).expand_as(x), x, f).clamp_(0, 1)


def _gamma(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return x.pow(f)  # inputs are in [0, 1] here, so is x ** gamma (no clamp needed)


def _hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by `f` turns: RGB -> HSV, h += f (mod 1), HSV -> RGB."""
    r, g, b = x.unbind(-3)
    vmin, vmax = torch.aminmax(x, dim=-3)
    chroma = vmax - vmin
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    sat = torch.where(vmax > 0, chroma / torch.where(vmax > 0, vmax, torch.ones_like(vmax)), torch.zeros_like(vmax))
    # Hue in sixths of a turn from whichever channel holds the maximum.
    h = torch.where(
        vmax == r, (g - b) / safe, torch.where(vmax == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe)
    )
    h = torch.where(chroma > 0, h, torch.zeros_like(h))
    h = torch.remainder(h / 6.0 + f.squeeze(-3), 1.0)
    # Closed-form HSV -> RGB: channel n uses k = (n + 6h) mod 6.
    h6 = (h * 6.0).unsqueeze(-3)
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(3, 1, 1)
    k = torch.remainder(n + h6, 6.0)
    ramp = torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
    return (vmax.unsqueeze(-3) * (1 - sat.unsqueeze(-3) * ramp)).clamp(0, 1)


_COLOR_OPS = (_brightness, _contrast, _saturation, _hue, _gamma)
_REPLICATED_RGB_OPS = (_brightness, _contrast_replicated, _saturation_replicated, _hue, _gamma)


def stack_views(views: torch.Tensor) -> torch.Tensor:
    """(V, B, C, H, W) -> (V * B, C, H, W), view-major (the layout ghost BN groups expect)."""
    return views.reshape(-1, *views.shape[2:])


__all__ = ["AugmentParams", "AugmentRanges", "CottaAugment", "ReflectAugment", "is_grey_rgb", "stack_views"]
