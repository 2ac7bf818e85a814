"""ViDA: injection leaves outputs unchanged, optimizer groups, HKA, adapter weights, warm-up, state."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import tta
from tta.adapters.vida import (
    ViDAConv2d,
    ViDALinear,
    adapter_parameter_names,
    inject_adapters,
    load_adapter_weights,
    save_adapter_weights,
    warmup_adapters,
)
from tta.errors import DataNotFoundError, StateMismatchError


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=4, in_chans=3, num_classes=10, embed_dim=32, depth=2,
                             num_heads=2, mlp_ratio=2.0).eval()


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 10)).eval()


def x16(b: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_injection_targets_attention_linears_and_keeps_outputs():
    model = tiny_vit()
    x = x16()
    with torch.no_grad():
        before = model(x)
    layers = inject_adapters(copy.deepcopy(model), seed=0)
    injected = copy.deepcopy(model)
    layers = inject_adapters(injected, seed=0)
    assert len(layers) == 4 and all(isinstance(m, ViDALinear) for m in layers)
    assert isinstance(injected.blocks[0].attn.qkv, ViDALinear) and isinstance(injected.blocks[1].attn.proj, ViDALinear)
    assert not isinstance(injected.blocks[0].mlp.fc1, ViDALinear)  # the MLP is not injected
    assert layers[0].down_high.weight.shape == (128, 32) and layers[0].down_low.weight.shape == (1, 32)
    assert torch.all(layers[0].up_low.weight == 0) and torch.all(layers[0].up_high.weight == 0)
    assert layers[0].down_high.weight.std().item() == pytest.approx(1 / 128**2, rel=0.1)
    with torch.no_grad():
        torch.testing.assert_close(injected(x), before, atol=0, rtol=0)
    assert layers[0].scales is layers[3].scales  # one HKA scale pair per model


def test_cnn_analogue_keeps_outputs_and_geometry():
    model = small_cnn()
    x = x16()
    with torch.no_grad():
        before = model(x)
    layers = inject_adapters(model, low_rank=1, high_rank=4, seed=0)
    assert len(layers) == 2 and all(isinstance(m, ViDAConv2d) for m in layers)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=0, rtol=0)
        layers[1].up_high.weight.normal_()
        assert model(x).shape == before.shape and not torch.allclose(model(x), before)


def test_optimizer_groups_hold_exactly_the_intended_parameters():
    adapter = tta.adapt(tiny_vit(), "vida", seed=0)
    groups = adapter.optimizer.param_groups
    assert [g["lr"] for g in groups] == [1e-4, 1e-5]
    names = dict((id(p), n) for n, p in adapter.model.named_parameters())
    adapter_names = set(adapter_parameter_names(adapter.model))
    assert {names[id(p)] for p in groups[1]["params"]} == adapter_names
    assert {names[id(p)] for p in groups[0]["params"]} == set(names.values()) - adapter_names
    assert all(p.requires_grad for p in adapter.model.parameters())
    assert not any(p.requires_grad for p in adapter.teacher.parameters())
    imagenet = tta.adapter_config("vida", preset="imagenet")
    assert (imagenet.optimizer, imagenet.lr, imagenet.adapter_lr, imagenet.restore_prob) == ("sgd", 5e-7, 2e-7, 0.0)


@pytest.mark.parametrize("hka", ["paper", "reference"])
def test_hka_scales_follow_uncertainty(hka):
    adapter = tta.adapt(tiny_vit(), "vida", seed=0, hka=hka, threshold=0.05)
    adapter._set_scales(torch.tensor(0.2))  # high uncertainty
    low, high = adapter._student_scales.tolist()
    assert low == pytest.approx(0.8) and high == pytest.approx(1.2 if hka == "paper" else 1.0)
    adapter._set_scales(torch.tensor(0.01))  # low uncertainty
    low, high = adapter._teacher_scales.tolist()
    assert low == pytest.approx(1.01) and high == pytest.approx(0.99 if hka == "paper" else 1.0)


def test_adaptation_steps_update_student_teacher_and_scales():
    adapter = tta.adapt(tiny_vit(), "vida", seed=0, n_views=3, lr=1e-3, adapter_lr=1e-3, ap=1.0)
    before = [p.detach().clone() for p in adapter.teacher.parameters()]
    out = adapter(x16())
    assert out.shape == (6, 10) and adapter.counters["aug_target"] == 1
    assert adapter._student_scales.tolist() != [1.0, 1.0]
    assert any(not torch.equal(p, q) for p, q in zip(adapter.teacher.parameters(), before))


def test_adapter_weights_round_trip_and_mismatch(tmp_path):
    model = tiny_vit()
    inject_adapters(model, seed=3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in adapter_parameter_names(model):
                p.normal_()
    path = save_adapter_weights(model, tmp_path / "w.safetensors", {"steps": 1})
    adapter = tta.adapt(tiny_vit(), "vida", seed=0, adapter_weights=str(path))
    theirs = dict(model.named_parameters())
    for n in adapter_parameter_names(adapter.model):
        assert torch.equal(adapter.model.get_parameter(n), theirs[n])
        assert torch.equal(adapter.teacher.get_parameter(n), theirs[n])
    with pytest.raises(DataNotFoundError, match="has shape"):
        tta.adapt(tiny_vit(), "vida", seed=0, high_rank=8, adapter_weights=str(path))
    with pytest.raises(DataNotFoundError, match="does not match"):
        tta.adapt(tiny_vit(), "vida", seed=0, targets=("qkv",), adapter_weights=str(path))
    with pytest.raises(DataNotFoundError, match="no ViDA adapter weights"):
        load_adapter_weights(model, tmp_path / "missing.safetensors")


def test_warmup_trains_only_the_adapters():
    model = tiny_vit()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = x16(32)
    y = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(0))
    stats = warmup_adapters(model, x, y, high_rank=8, steps=5, batch_size=8, lr=1e-2)
    assert stats["steps"] == 5 and stats["adapter_parameters"] > 0
    params = dict(model.named_parameters())
    for n, p in frozen.items():
        assert torch.equal(params[n], p), n
    assert any(torch.any(params[n] != 0) for n in adapter_parameter_names(model) if ".up_" in n)


def test_state_round_trip_and_reset(tmp_path):
    xs = [x16(b=4, seed=i) for i in range(3)]
    kw = dict(seed=4, n_views=2, high_rank=8, lr=1e-3, adapter_lr=1e-3, ap=1.0)
    a = tta.adapt(tiny_vit(), "vida", **kw)
    a(xs[0])
    a.save(tmp_path / "vida.pt")
    b = tta.adapt(tiny_vit(), "vida", **kw)
    b(xs[2])  # b's own adapted state, generators and counters diverge; the load replaces them all
    b.load(tmp_path / "vida.pt")
    torch.testing.assert_close(a(xs[1]), b(xs[1]), atol=0, rtol=0)
    # the injected branches' initialisation depends on the seed: it is part of the source (anchor)
    other_source = tta.adapt(tiny_vit(), "vida", **{**kw, "seed": 5})
    with pytest.raises(StateMismatchError, match="frozen tensor 'anchor.*down_.*differs"):
        other_source.load(tmp_path / "vida.pt")
    fresh = tta.adapt(tiny_vit(), "vida", **kw)
    a.reset()
    assert a._student_scales.tolist() == [1.0, 1.0]
    torch.testing.assert_close(a(xs[0]), fresh(xs[0]), atol=0, rtol=0)


@pytest.mark.data
def test_warmup_cli_writes_adapters_beside_the_card_and_the_cli_rule_finds_them(tmp_path):
    import yaml

    from tta.adapters.teacher import card_defaults
    from tta.adapters.vida import VidaConfig
    from tta.cli import main
    from tta.models.checkpoint import save_state_dict, sha256_file
    from tta.streams.fashion_mnist import default_dir

    if not (default_dir() / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is not installed")
    model = VisionTransformer(img_size=32, patch_size=8, num_classes=10, embed_dim=16, depth=1, num_heads=2)
    save_state_dict(model.state_dict(), tmp_path / "tiny.safetensors")
    card = {"name": "tiny", "arch": "timm:vit_tiny_patch16_224", "num_classes": 10, "checkpoint": "tiny.safetensors",
            "sha256": sha256_file(tmp_path / "tiny.safetensors"), "input_size": [3, 32, 32],
            "arch_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2},
            "dataset": "fashion-mnist", "cotta_threshold": 0.61}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(card))
    rc = main(["warmup-adapters", "--model", str(tmp_path / "tiny.yaml"), "--steps", "2", "--batch-size", "8",
               "--high-rank", "4", "--limit-train", "64", "--no-progress"])
    assert rc == 0 and (tmp_path / "tiny.vida.safetensors").is_file()
    resolved = card_defaults(VidaConfig, {"ap": "card"}, str(tmp_path / "tiny.yaml"))
    assert resolved == {"ap": 0.61, "adapter_weights": str(tmp_path / "tiny.vida.safetensors")}
