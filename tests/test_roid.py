"""ROID: diversity/certainty weighting, the soft likelihood ratio loss, the consistency loss,
weight ensembling and prior correction against hand derivations; its reflect-padded views against
torchvision's transforms."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

import tta
from norm_oracle import affine_bn_model, bn_logits, entropy, leaf
from tta.augment import AugmentParams, ReflectAugment

C, N = 5, 16


def features(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, C, generator=g) * torch.linspace(0.5, 2.0, C)


def source_affine() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(C, generator=g) * 2 + 1.5, torch.randn(C, generator=g) * 0.3


def normalise(v: torch.Tensor) -> torch.Tensor:
    return (v - v.min()) / (v.max() - v.min())


def weights_by_hand(z: torch.Tensor, class_probs: torch.Tensor):
    p = torch.softmax(z, 1)
    cos = (p @ class_probs) / (p.norm(dim=1) * class_probs.norm())
    div = normalise(1 - cos)
    keep = div >= div.mean()
    cert = normalise(-entropy(z))
    w = torch.exp(div * cert * 3.0)  # temperature 1/3
    return torch.where(keep, w, torch.zeros_like(w)), keep


def slr_by_hand(z: torch.Tensor) -> torch.Tensor:
    q = torch.softmax(z, 1).clamp(max=0.99)
    return -(q * torch.log(q / (1 - q) + 1e-5)).sum(1)


def prior_by_hand(z: torch.Tensor) -> torch.Tensor:
    pi = torch.softmax(z, 1).mean(0)
    s = max(1 / z.shape[0], 1 / z.shape[1]) / pi.max()
    return z * (pi + s) / (1 + s * z.shape[1])


def test_roid_step_without_consistency_matches_a_hand_derivation():
    gamma0, beta0 = source_affine()
    lr = 0.5
    adapter = tta.adapt(affine_bn_model(gamma0, beta0), "roid", optimizer="sgd", lr=lr, momentum=0.0,
                        use_consistency=False)
    gamma, beta = gamma0, beta0
    class_probs = torch.full((C,), 1 / C)
    for step, seed in enumerate((1, 2, 3)):
        feats = features(seed)
        out = adapter(feats.view(N, C, 1, 1))
        g, b = leaf(gamma), leaf(beta)
        z = bn_logits(feats, g, b)
        w, keep = weights_by_hand(z.detach(), class_probs)
        assert 0 < int(keep.sum()) < N
        ((slr_by_hand(z) * w)[keep].sum() / N).backward()
        gamma = 0.99 * (g - lr * g.grad).detach() + 0.01 * gamma0  # step, then ensembling with the source
        beta = 0.99 * (b - lr * b.grad).detach() + 0.01 * beta0
        class_probs = 0.9 * class_probs + 0.1 * torch.softmax(z.detach(), 1).mean(0)
        torch.testing.assert_close(out, prior_by_hand(z.detach()), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(adapter.model[1].weight.detach(), gamma, atol=1e-5, rtol=1e-5, msg=f"step {step}")
        torch.testing.assert_close(adapter.model[1].bias.detach(), beta, atol=1e-5, rtol=1e-5, msg=f"step {step}")
        torch.testing.assert_close(adapter.class_probs, class_probs, atol=1e-6, rtol=1e-5)


class ScaleShift:
    """A deterministic stand-in for the augmentation: view = 0.7 x + 0.2 (one view)."""

    def draw(self, n_views, size, generator):
        return None

    def apply(self, x, params, noise):
        return (0.7 * x + 0.2).unsqueeze(0)


def test_consistency_term_matches_a_hand_derivation():
    gamma0, beta0 = source_affine()
    lr = 0.5
    adapter = tta.adapt(affine_bn_model(gamma0, beta0), "roid", optimizer="sgd", lr=lr, momentum=0.0,
                        use_prior_correction=False)
    adapter.augment = ScaleShift()
    feats = features(1)
    out = adapter(feats.view(N, C, 1, 1))
    g, b = leaf(gamma0), leaf(beta0)
    z = bn_logits(feats, g, b)
    w, keep = weights_by_hand(z.detach(), torch.full((C,), 1 / C))
    za = bn_logits(0.7 * feats[keep] + 0.2, g, b)  # the view batch: the kept images, own statistics
    zk = z[keep]
    sce = -0.5 * (torch.softmax(zk, 1) * torch.log_softmax(za, 1)).sum(1) \
        - 0.5 * (torch.softmax(za, 1) * torch.log_softmax(zk, 1)).sum(1)
    loss = (slr_by_hand(z) * w)[keep].sum() / N + (sce * w[keep]).sum() / N
    loss.backward()
    torch.testing.assert_close(out, z.detach(), atol=1e-5, rtol=1e-5)  # prior correction off
    torch.testing.assert_close(adapter.model[1].weight.detach(), 0.99 * (g - lr * g.grad).detach() + 0.01 * gamma0,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adapter.model[1].bias.detach(), 0.99 * (b - lr * b.grad).detach() + 0.01 * beta0,
                               atol=1e-5, rtol=1e-5)


def test_prior_correction_on_probabilities_and_switches():
    gamma0, beta0 = source_affine()
    feats = features(2)
    z = bn_logits(feats, gamma0, beta0)
    probs = tta.adapt(affine_bn_model(gamma0, beta0), "roid", prior_on="probs")(feats.view(N, C, 1, 1))
    pi = torch.softmax(z, 1).mean(0)
    s = max(1 / N, 1 / C) / pi.max()
    torch.testing.assert_close(probs.softmax(1), torch.softmax(z, 1) * (pi + s) / (1 + s * C)
                               / (torch.softmax(z, 1) * (pi + s) / (1 + s * C)).sum(1, keepdim=True),
                               atol=1e-6, rtol=1e-5)
    plain = tta.adapt(affine_bn_model(gamma0, beta0), "roid", use_weighting=False, use_prior_correction=False,
                      use_consistency=False, momentum_src=1.0, optimizer="sgd", lr=0.5, momentum=0.0)
    plain(feats.view(N, C, 1, 1))
    g, b = leaf(gamma0), leaf(beta0)
    (slr_by_hand(bn_logits(feats, g, b)).sum() / N).backward()  # unweighted SLR, no ensembling
    torch.testing.assert_close(plain.model[1].weight.detach(), (g - 0.5 * g.grad).detach(), atol=1e-5, rtol=1e-5)


def test_undefined_weights_are_not_applied():
    """Equal samples: min-max normalisation divides by zero; the step is skipped, not applied."""
    gamma0, beta0 = source_affine()
    adapter = tta.adapt(affine_bn_model(gamma0, beta0), "roid")
    adapter(torch.zeros(N, C, 1, 1))  # every sample's logits equal beta
    assert adapter.counters["skipped_nonfinite_loss"] == 1
    assert torch.isfinite(adapter.model[1].weight).all() and torch.isfinite(adapter.class_probs).all()


@pytest.mark.parametrize("angle,shift,scale,flip", [(0.0, (0.0, 0.0), 1.0, False), (10.0, (2.0, -1.0), 1.07, False),
                                                    (-15.0, (-2.0, 2.0), 0.9, True), (7.3, (1.0, 0.0), 1.0, False)])
def test_reflect_views_match_torchvision_pad_affine_crop_flip(angle, shift, scale, flip):
    n = 16
    x = torch.rand(2, 3, n, n, generator=torch.Generator().manual_seed(0))
    params = AugmentParams(
        factors=torch.tensor([[1.0, 1.0, 1.0, 0.0, 1.0]]), order=torch.arange(5).view(1, 5),
        angle=torch.tensor([math.radians(angle)]), shift=torch.tensor([shift]), scale=torch.tensor([scale]),
        blur=torch.zeros(1, 5), flip=torch.tensor([flip]),
    )
    out = ReflectAugment().apply(x, params, None)[0]
    padded = TF.pad(x, [n // 2] * 4, padding_mode="reflect")
    warped = TF.affine(padded, angle=angle, translate=list(shift), scale=scale, shear=[0.0, 0.0],
                       interpolation=InterpolationMode.BILINEAR, fill=0)
    want = TF.center_crop(warped, [n, n])
    torch.testing.assert_close(out, want.flip(-1) if flip else want, atol=1e-5, rtol=0)


def test_reflect_views_keep_colour_jitter_and_skip_blur_and_noise():
    x = torch.rand(3, 3, 8, 8)
    aug = ReflectAugment()
    params = aug.draw(1, (8, 8), torch.Generator().manual_seed(2))
    params.angle.zero_(), params.shift.zero_(), params.scale.fill_(1.0), params.flip.fill_(False)
    jitter_only = aug._color_jitter(x.unsqueeze(0), params, False)[0]
    torch.testing.assert_close(aug.apply(x, params, None)[0], jitter_only, atol=1e-5, rtol=0)
