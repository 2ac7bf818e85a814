"""DeYO: patch shuffling, the PLPD and entropy selection and the sample weights against hand
derivations; the other object-destroying augmentations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import tta
from norm_oracle import bn_logits, entropy, leaf
from tta.adapters.deyo import occlude, patch_shuffle, pixel_shuffle

C, N, SIDE = 5, 24, 4


def model_and_weights(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, 3 * SIDE * SIDE, generator=g) * 0.6
    gamma, beta = torch.rand(C, generator=g) * 2 + 2.0, torch.randn(C, generator=g) * 0.3
    lin = nn.Linear(3 * SIDE * SIDE, C, bias=False)
    bn = nn.BatchNorm1d(C)
    with torch.no_grad():
        lin.weight.copy_(w)
        bn.weight.copy_(gamma)
        bn.bias.copy_(beta)
    return nn.Sequential(nn.Flatten(), lin, bn).eval(), w, gamma, beta


def images(seed: int) -> torch.Tensor:
    return torch.rand(N, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


def shuffle_by_hand(x: torch.Tensor, patch_len: int, u: torch.Tensor) -> torch.Tensor:
    """Patch k of the output is patch argsort(u)[k] of the input (patches in row-major order)."""
    p = x.shape[-1] // patch_len
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        order = torch.argsort(u[i])
        for k in range(patch_len * patch_len):
            src = int(order[k])
            r, c = divmod(k, patch_len)
            sr, sc = divmod(src, patch_len)
            out[i, :, r * p : (r + 1) * p, c * p : (c + 1) * p] = x[i, :, sr * p : (sr + 1) * p, sc * p : (sc + 1) * p]
    return out


def test_deyo_step_matches_a_hand_derivation():
    model, w, gamma, beta = model_and_weights()
    lr, seed, thr = 0.2, 7, 0.1
    adapter = tta.adapt(model, "deyo", optimizer="sgd", lr=lr, momentum=0.0, patch_len=2, seed=seed,
                        plpd_threshold=thr)
    g = torch.Generator().manual_seed(seed)  # the adapter's CPU generator, seeded with its seed
    seen = []
    for step, data_seed in enumerate((1, 2, 3)):
        x = images(data_seed)
        out = adapter(x)
        gm, bt = leaf(gamma), leaf(beta)
        z = bn_logits(x.flatten(1) @ w.T, gm, bt)
        h = entropy(z)
        s1 = h.detach() < 0.5 * math.log(C)
        u = torch.rand(int(s1.sum()), 4, generator=g)
        destroyed = shuffle_by_hand(x[s1], 2, u)
        with torch.no_grad():
            z_destroyed = bn_logits(destroyed.flatten(1) @ w.T, gamma, beta)  # batch statistics of S1's images
        p, p_destroyed = torch.softmax(z.detach()[s1], 1), torch.softmax(z_destroyed, 1)
        label = p.argmax(1)
        plpd = p[torch.arange(len(label)), label] - p_destroyed[torch.arange(len(label)), label]
        s2 = plpd > thr
        seen.append((N, int(s1.sum()), int(s2.sum())))
        hs = h[s1][s2]
        weight = torch.exp(-(hs.detach() - 0.4 * math.log(C))) + torch.exp(plpd[s2])
        (weight * hs).mean().backward()
        gamma, beta = (gm - lr * gm.grad).detach(), (bt - lr * bt.grad).detach()
        torch.testing.assert_close(out, z.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(adapter.model[2].weight.detach(), gamma, atol=1e-5, rtol=1e-5, msg=f"step {step}")
        torch.testing.assert_close(adapter.model[2].bias.detach(), beta, atol=1e-5, rtol=1e-5, msg=f"step {step}")
    assert all(n > n1 > n2 > 0 for n, n1, n2 in seen), f"the test needs partial selections: {seen}"
    assert adapter.counters["reliable"] == sum(s[1] for s in seen)
    assert adapter.counters["selected"] == sum(s[2] for s in seen)


def test_weights_can_be_switched_off():
    model, w, gamma, beta = model_and_weights()
    lr = 0.2
    adapter = tta.adapt(model, "deyo", optimizer="sgd", lr=lr, momentum=0.0, patch_len=2, seed=3, plpd_threshold=-2.0,
                        reweight_ent=False, reweight_plpd=False)
    x = images(1)
    adapter(x)
    gm, bt = leaf(gamma), leaf(beta)
    h = entropy(bn_logits(x.flatten(1) @ w.T, gm, bt))
    h[h.detach() < 0.5 * math.log(C)].mean().backward()  # PLPD > -2 keeps every reliable sample, weight 1
    torch.testing.assert_close(adapter.model[2].weight.detach(), (gm - lr * gm.grad).detach(), atol=1e-5, rtol=1e-5)


def test_patch_shuffle_permutes_whole_patches_per_image():
    x = torch.rand(6, 3, 8, 8)
    out = patch_shuffle(x, 4, torch.Generator().manual_seed(0))
    patches = lambda t: t.reshape(6, 3, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(6, 16, -1)  # noqa: E731
    a, b = patches(x), patches(out)
    for i in range(6):  # the same 16 patches, in another order
        key = lambda t: sorted(t.tolist())  # noqa: E731
        assert key(a[i]) == key(b[i])
    assert not torch.equal(out, x)
    orders = {tuple(torch.cdist(b[i], a[i]).argmin(1).tolist()) for i in range(6)}
    assert len(orders) > 1  # one permutation per image


def test_patch_shuffle_resizes_sizes_that_are_not_multiples():
    x = torch.rand(2, 1, 10, 13)
    out = patch_shuffle(x, 4, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    one = patch_shuffle(torch.full((1, 1, 10, 13), 0.3), 4, torch.Generator().manual_seed(0))
    torch.testing.assert_close(one, torch.full_like(one, 0.3))
    with pytest.raises(tta.errors.InvalidInputError, match="patches"):
        patch_shuffle(torch.rand(1, 1, 3, 3), 4, torch.Generator())


def test_pixel_shuffle_and_occlusion():
    x = torch.rand(3, 2, 5, 5)
    out = pixel_shuffle(x, torch.Generator().manual_seed(1))
    assert torch.equal(out.flatten(2).sort(-1).values, x.flatten(2).sort(-1).values)
    moved = (out.flatten(2)[:, :, :, None] == x.flatten(2)[:, :, None, :]).float().argmax(-1)
    assert torch.equal(moved[0, 0], moved[2, 1])  # one permutation for the whole batch
    occ = occlude(x, 2, 1, 3)
    torch.testing.assert_close(occ[:, :, 1:3, 3:5], x.mean((2, 3), keepdim=True).expand(-1, -1, 2, 2))
    assert torch.equal(occ[:, :, 0], x[:, :, 0])
    for aug in ("pixel", "occ"):
        model, *_ = model_and_weights()
        adapted = tta.adapt(model, "deyo", aug_type=aug, occlusion_size=2, row_start=1, column_start=1)
        assert torch.isfinite(adapted(images(1))).all()
