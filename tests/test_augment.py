"""CoTTA augmentation: batched views equal per-view application, colour ops match torchvision,
the fused pad/affine/crop geometry behaves like edge padding, and the draws are reproducible."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from tta.augment import AugmentParams, CottaAugment, _contrast, _hue, _saturation, stack_views


def identity_params(v: int = 1) -> AugmentParams:
    blur = torch.zeros(v, 5)
    blur[:, 2] = 1.0
    return AugmentParams(
        factors=torch.tensor([[1.0, 1.0, 1.0, 0.0, 1.0]]).repeat(v, 1),
        order=torch.arange(5).repeat(v, 1),
        angle=torch.zeros(v), shift=torch.zeros(v, 2), scale=torch.ones(v), blur=blur,
        flip=torch.zeros(v, dtype=torch.bool),
    )


@pytest.mark.parametrize("grey", [False, True])
def test_batched_views_equal_per_view_application(grey):
    aug = CottaAugment()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 12, 12)
    if grey:
        x = x[:, :1].expand(-1, 3, -1, -1).contiguous()
    params = aug.draw(9, (12, 12), g)
    noise = aug.noise(9, x, g)
    batched = aug.apply(x, params, noise)
    single = torch.cat([aug.apply(x, params.views(i, i + 1), noise[i : i + 1]) for i in range(9)])
    assert batched.shape == (9, 5, 3, 12, 12)
    torch.testing.assert_close(batched, single, atol=1e-6, rtol=0)
    assert batched.min() >= 0 and batched.max() <= 1
    assert stack_views(batched).shape == (45, 3, 12, 12)


def test_grey_rgb_shortcut_equals_the_three_channel_transform():
    """A grey RGB batch is transformed as one channel; the full three-channel transform (hue and
    saturation computed) gives the same views, with the noise drawn per channel."""
    aug = CottaAugment()
    g = torch.Generator().manual_seed(4)
    x = torch.rand(6, 1, 14, 14).expand(-1, 3, -1, -1).contiguous()
    params = aug.draw(12, (14, 14), g)
    noise = aug.noise(12, x, g)
    fast = aug.apply(x, params, noise)
    full = (aug._transform(x, params) + noise).clamp(0, 1)
    torch.testing.assert_close(fast, full, atol=2e-6, rtol=0)
    assert not torch.equal(fast[:, :, 0], fast[:, :, 1])  # the noise differs per channel
    torch.testing.assert_close(aug.apply(x, params, None), aug._transform(x, params).clamp(0, 1),
                               atol=2e-6, rtol=0)


def test_views_differ_and_draws_are_reproducible():
    aug = CottaAugment()
    x = torch.rand(4, 3, 16, 16)
    out = []
    for _ in range(2):
        g = torch.Generator().manual_seed(7)
        p = aug.draw(6, (16, 16), g)
        out.append(aug.apply(x, p, aug.noise(6, x, g)))
    torch.testing.assert_close(out[0], out[1], atol=0, rtol=0)
    assert not torch.allclose(out[0][0], out[0][1])


def test_noise_drawn_in_chunks_equals_one_draw_on_cpu():
    aug = CottaAugment()
    x = torch.rand(3, 3, 8, 8)
    g = torch.Generator().manual_seed(1)
    whole = aug.noise(5, x, g)
    g.manual_seed(1)
    parts = torch.cat([aug.noise(2, x, g), aug.noise(1, x, g), aug.noise(2, x, g)])
    assert torch.equal(whole, parts)


@pytest.mark.parametrize("hue", [-0.06, 0.02, 0.3])
def test_hue_matches_torchvision(hue):
    x = torch.rand(4, 3, 10, 10)
    torch.testing.assert_close(_hue(x, torch.tensor(hue).view(1, 1, 1, 1)), TF.adjust_hue(x, hue), atol=2e-6, rtol=0)


def test_contrast_and_saturation_match_torchvision():
    x = torch.rand(4, 3, 10, 10)
    f = torch.tensor(0.7).view(1, 1, 1, 1)
    torch.testing.assert_close(_contrast(x, f), TF.adjust_contrast(x, 0.7), atol=1e-6, rtol=0)
    torch.testing.assert_close(_saturation(x, f * 2), TF.adjust_saturation(x, 1.4), atol=1e-6, rtol=0)


def test_identity_parameters_leave_the_image_unchanged():
    x = torch.rand(2, 3, 9, 9)
    out = CottaAugment().apply(x, identity_params(), None)[0]
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_translation_samples_the_edge_padded_image():
    """A whole-pixel shift equals slicing the edge-padded image (what pad -> affine -> crop does)."""
    x = torch.rand(2, 3, 8, 8)
    p = identity_params()
    p.shift[:] = torch.tensor([[3.0, -2.0]])  # +3 px right, 2 px up
    out = CottaAugment().apply(x, p, None)[0]
    padded = F.pad(x, (4, 4, 4, 4), mode="replicate")
    expected = padded[..., 4 + 2 : 4 + 2 + 8, 4 - 3 : 4 - 3 + 8]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_flip_and_blur_taps():
    x = torch.rand(1, 1, 6, 6)
    p = identity_params()
    p.flip[:] = True
    out = CottaAugment().apply(x, p, None)[0]
    torch.testing.assert_close(out, x.flip(-1), atol=1e-5, rtol=0)
    params = CottaAugment().draw(50, (6, 6), torch.Generator().manual_seed(0))
    torch.testing.assert_close(params.blur.sum(1), torch.ones(50))
    assert torch.all(params.blur[:, 2] >= params.blur[:, 1])


def test_draw_needs_a_cpu_generator_and_a_4d_batch():
    aug = CottaAugment()
    with pytest.raises(Exception, match="4|shape"):
        aug.apply(torch.rand(3, 8, 8), aug.draw(1, (8, 8), torch.Generator()), None)
