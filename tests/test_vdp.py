"""VDP: frozen backbone (bit-identical), only prompts change, homeostasis rule, state, reset."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import tta
from tta.adapters.vdp import VisualPrompt
from tta.errors import ConfigError, InvalidInputError


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=4, in_chans=3, num_classes=10, embed_dim=32, depth=2,
                             num_heads=2, mlp_ratio=2.0).eval()


def x16(b: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def make(**cfg):
    return tta.adapt(tiny_vit(), "vdp", seed=0, n_views=3, lr=1e-2, ap=1.0, **cfg)


def test_backbone_bit_identical_and_only_prompts_change():
    adapter = make()
    backbone = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    for i in range(3):
        out = adapter(x16(seed=i))
    assert out.shape == (6, 10)
    for k, v in adapter.model.state_dict().items():
        assert torch.equal(v, backbone[k]), k
    assert adapter.prompt.agnostic.abs().sum() > 0 and adapter.prompt.specific.abs().sum() > 0
    assert adapter.teacher_prompt.agnostic.abs().sum() > 0
    # prompts only where the masks are
    assert torch.all(adapter.prompt.prompt()[:, 4:-4, 4:-4] == 0) or adapter.prompt.patch_mask[0, 4:-4, 4:-4].any()
    opt_params = {id(p) for g in adapter.optimizer.param_groups for p in g["params"]}
    assert opt_params == {id(adapter.prompt.agnostic), id(adapter.prompt.specific)}
    assert not any(p.requires_grad for p in adapter.model.parameters())


def test_prompt_geometry_defaults():
    adapter = make()
    p = adapter.prompt
    assert p.size == (16, 16)  # from the timm model's img_size
    assert p.frame_mask.sum() == 16 * 16 - 14 * 14  # frame width 16 // 16 = 1
    assert p.patch_mask.sum() == 4 * 2 * 2  # 4 corner patches of 16 // 8 = 2 px
    assert not torch.any(p.frame_mask * p.patch_mask)
    with pytest.raises(ConfigError):
        VisualPrompt(3, (16, 16), frame_width=8, patch_size=2, num_patches=4, scale=0.1)
    with pytest.raises(InvalidInputError, match="takes 16x16 images"):
        adapter(torch.rand(4, 3, 20, 20))
    with pytest.raises(InvalidInputError, match="image_size"):  # the prompts' own check
        adapter.prompt(torch.rand(4, 3, 20, 20))


def test_homeostasis_scales_the_agnostic_update_by_importance():
    free = make(homeostasis=0.0)
    held = make(homeostasis=5.0)
    x = x16()
    free(x), held(x)
    importance = held.importance
    assert torch.equal(importance, free.importance)  # same gradients on the first step
    frame = held.prompt.frame_mask.expand_as(importance) > 0
    keep = 1 / (1 + 5.0 * importance / importance[frame].mean())
    torch.testing.assert_close(held.prompt.agnostic, free.prompt.agnostic * keep, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(held.prompt.specific, free.prompt.specific)  # specific prompts are not held


def test_state_round_trip_reset_and_fork(tmp_path):
    a = make()
    a(x16(seed=0))
    a.save(tmp_path / "vdp.pt")
    b = tta.adapt(tiny_vit(), "vdp", seed=7, n_views=3, lr=1e-2, ap=1.0)
    b.load(tmp_path / "vdp.pt")
    torch.testing.assert_close(a(x16(seed=1)), b(x16(seed=1)), atol=0, rtol=0)
    f = a.fork()
    assert f.prompt.agnostic is not a.prompt.agnostic
    assert f.model.get_parameter("head.weight") is a.model.get_parameter("head.weight")  # frozen, shared
    a.reset()
    assert torch.all(a.prompt.agnostic == 0) and torch.all(a.importance == 0)
    fresh = make()
    torch.testing.assert_close(a(x16(seed=2)), fresh(x16(seed=2)), atol=0, rtol=0)
