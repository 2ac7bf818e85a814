"""Architectures, safe checkpoint loading, feature access, preprocessing and source-training helpers."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tta.errors import ConfigError, DataNotFoundError, StateMismatchError
from tta.models import Normalized, build_model, load, load_state_dict, load_weights, save_state_dict, sha256_file
from tta.models import builders
from tta.models.cards import ModelCard
from tta.models.features import classifier_name, extract_features, features_and_logits
from tta.models.preprocessing import get_preprocessing
from tta.models.resnet_cifar import resnet20
from tta.models.training import augment, channel_stats, cotta_threshold, evaluate
from tta.models.wide_resnet import wrn28_10

# --- built-in architectures -------------------------------------------------------------------


def test_resnet20_shape_and_size() -> None:
    model = resnet20(num_classes=10).eval()
    assert sum(p.numel() for p in model.parameters()) == 272_474  # ResNet-20 option B, 0.27M
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 21


def _robustbench_wrn28_10_state(num_classes: int = 10) -> dict[str, torch.Tensor]:
    """A state dict written from RobustBench's Standard WRN-28-10 layout (not from our module)."""
    g = torch.Generator().manual_seed(1)
    state: dict[str, torch.Tensor] = {}

    def bn(prefix: str, c: int) -> None:
        state[f"{prefix}.weight"] = torch.rand(c, generator=g) + 0.5
        state[f"{prefix}.bias"] = torch.randn(c, generator=g) * 0.1
        state[f"{prefix}.running_mean"] = torch.randn(c, generator=g) * 0.1
        state[f"{prefix}.running_var"] = torch.rand(c, generator=g) + 0.5
        state[f"{prefix}.num_batches_tracked"] = torch.tensor(1000)

    def conv(name: str, cout: int, cin: int, k: int) -> None:
        state[name] = torch.randn(cout, cin, k, k, generator=g) * (2.0 / (cin * k * k)) ** 0.5

    conv("conv1.weight", 16, 3, 3)
    cin = 16
    for b, cout in zip((1, 2, 3), (160, 320, 640)):
        for i in range(4):
            p = f"block{b}.layer.{i}"
            bn(f"{p}.bn1", cin)
            conv(f"{p}.conv1.weight", cout, cin, 3)
            bn(f"{p}.bn2", cout)
            conv(f"{p}.conv2.weight", cout, cout, 3)
            if i == 0:
                conv(f"{p}.convShortcut.weight", cout, cin, 1)
            cin = cout
    bn("bn1", 640)
    state["fc.weight"] = torch.randn(num_classes, 640, generator=g) * 0.01
    state["fc.bias"] = torch.zeros(num_classes)
    return state


def test_wrn28_10_loads_robustbench_state_dict(tmp_path: Path) -> None:
    state = _robustbench_wrn28_10_state()
    assert sum(v.numel() for k, v in state.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))) == 36_479_194
    # RobustBench checkpoints are {"state_dict": ...} with DataParallel's "module." prefix.
    path = tmp_path / "Standard.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    model = load_weights("wrn28_10", path, num_classes=10)  # RobustBench Standard: no normalisation
    assert not isinstance(model, Normalized) and not model.training
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_wrn28_10_wrong_keys_name_the_file(tmp_path: Path) -> None:
    state = _robustbench_wrn28_10_state()
    state["block1.layer.0.shortcut.weight"] = state.pop("block1.layer.0.convShortcut.weight")
    state["fc.weight"] = torch.zeros(100, 640)
    path = tmp_path / "bad.safetensors"
    save_state_dict(state, path)
    with pytest.raises(StateMismatchError, match=r"bad\.safetensors.*missing keys: block1\.layer\.0\.convShortcut\.weight.*unexpected keys.*shape mismatch: fc\.weight"):
        load_weights("wrn28_10", path, num_classes=10)


def test_vit_builtin_is_timm_vit_patch4() -> None:
    from timm.models.vision_transformer import VisionTransformer

    model = build_model("vit_patch4_32", num_classes=10, embed_dim=32, depth=1, num_heads=2).eval()
    assert isinstance(model, VisionTransformer)
    assert model.patch_embed.num_patches == 64
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_unknown_architecture() -> None:
    with pytest.raises(ConfigError, match="no_such_net"):
        build_model("no_such_net")
    with pytest.raises(ConfigError, match="torchvision"):
        build_model("torchvision:no_such_net")


# --- local weights for timm / torchvision models -----------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_resnet18_local_weights_round_trip(tmp_path: Path, suffix: str) -> None:
    src = build_model("timm:resnet18", num_classes=7).eval()
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        save_state_dict(src.state_dict(), path)
    else:
        torch.save(src.state_dict(), path)
    model = load_weights("timm:resnet18", path, num_classes=7, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                         sha256=sha256_file(path))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = src((x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        assert torch.allclose(model(x), ref, atol=1e-5)


def test_torchvision_local_weights_round_trip(tmp_path: Path) -> None:
    src = build_model("torchvision:resnet18", num_classes=5).eval()
    path = tmp_path / "tv.safetensors"
    save_state_dict(src.state_dict(), path)
    model = load_weights("torchvision:resnet18", path, num_classes=5)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), src(x), atol=1e-5)


# --- pretrained=True never hangs offline ------------------------------------------------------


def test_pretrained_offline_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(DataNotFoundError, match=r"HF_HUB_OFFLINE is set.*local file"):
        build_model("timm:resnet18", pretrained=True)
    with pytest.raises(DataNotFoundError, match="torchvision model 'resnet50'"):
        build_model("torchvision:resnet50", num_classes=1000, pretrained=True)
    assert time.perf_counter() - start < 2.0  # no download attempt, no retries


def test_pretrained_unreachable_host_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in builders.OFFLINE_ENV:
        monkeypatch.delenv(var, raising=False)
    probed: list[str] = []
    monkeypatch.setattr(builders, "_reachable", lambda host, *a, **k: probed.append(host) or False)
    with pytest.raises(DataNotFoundError, match="huggingface.co is not reachable"):
        build_model("timm:resnet18", pretrained=True)
    assert probed == ["huggingface.co"]


def test_builtin_pretrained_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="checkpoint"):
        build_model("resnet20", pretrained=True)


# --- checkpoint safety ---------------------------------------------------------------------------


class _Payload:
    """Unpickling this object runs `Path.touch(marker)`: stands in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("fmt", ["torch-zip", "raw-pickle"])
def test_malicious_pickle_is_never_executed(tmp_path: Path, fmt: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"conv1.weight": torch.zeros(1), "extra": _Payload(marker)}
    if fmt == "torch-zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(StateMismatchError, match=r"refused to load .*evil\.pt.*not executed"):
        load_state_dict(path)
    # Also through a card whose checksum matches the file: the checksum is no licence to unpickle.
    card = ModelCard(name="evil", arch="resnet20", num_classes=10, checkpoint=str(path), sha256=sha256_file(path))
    with pytest.raises(StateMismatchError, match="refused"):
        load(card)
    assert not marker.exists()
    # Sanity check of the test itself: a full unpickle does run the payload.
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


def test_tampered_checkpoint_fails_checksum(tmp_path: Path) -> None:
    path = tmp_path / "net.safetensors"
    sha = save_state_dict(resnet20().state_dict(), path)
    card = ModelCard(name="net", arch="resnet20", num_classes=10, checkpoint=str(path), sha256=sha)
    load(card)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StateMismatchError, match=r"checksum mismatch for checkpoint .*net\.safetensors"):
        load(card)


def test_missing_and_garbage_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match=r"nope\.safetensors does not exist"):
        load_state_dict(tmp_path / "nope.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(DataNotFoundError, match="garbage.safetensors"):
        load_state_dict(garbage)
    not_a_state = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_a_state)
    with pytest.raises(StateMismatchError, match="list.pt"):
        load_state_dict(not_a_state)


# --- normalisation and features --------------------------------------------------------------


def test_normalized_wrapper_applies_mean_std() -> None:
    net = resnet20().eval()
    model = Normalized(net, (0.2, 0.3, 0.4), (0.5, 0.6, 0.7)).eval()
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor([0.2, 0.3, 0.4]).view(1, 3, 1, 1)
    std = torch.tensor([0.5, 0.6, 0.7]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), net((x - mean) / std), atol=1e-6)
    assert {"mean", "std"} <= set(model.state_dict())
    with pytest.raises(ValueError):
        Normalized(net, (0.0,), (0.0,))


@pytest.mark.parametrize("arch,size,dim", [("resnet20", 32, 64), ("vit_patch4_32", 32, 32), ("timm:resnet18", 32, 512),
                                           ("torchvision:resnet18", 32, 512), ("torchvision:mobilenet_v3_small", 32, 1024)])
def test_features_are_classifier_inputs(arch: str, size: int, dim: int) -> None:
    kwargs = {"embed_dim": 32, "depth": 1, "num_heads": 2} if arch.startswith("vit") else {}
    model = Normalized(build_model(arch, num_classes=10, **kwargs), (0.5,) * 3, (0.25,) * 3).eval()
    x = torch.rand(3, 3, size, size)
    with torch.no_grad():
        feats, logits = features_and_logits(model, x)
        assert feats.shape == (3, dim)
        assert torch.allclose(logits, model(x), atol=1e-5)
        # The features are what the final linear classifier sees.
        net = model.model
        head = net.get_submodule(classifier_name(net))
        assert torch.allclose(head(feats), logits, atol=1e-5)
        assert torch.allclose(extract_features(model, x), feats)


def test_features_by_module_name() -> None:
    model = build_model("torchvision:resnet18", num_classes=10).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        feats = extract_features(model, x, layer="fc")
        assert torch.allclose(model.fc(feats), model(x), atol=1e-5)
    with pytest.raises(Exception, match="no module named 'head'"):
        extract_features(model, x, layer="head")


# --- preprocessing presets -----------------------------------------------------------------------


def test_imagenet_preprocessing_presets() -> None:
    img = torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8)
    out = get_preprocessing("Res256Crop224")(img)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    assert get_preprocessing("Crop288")(img).shape == (3, 288, 288)
    small = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    assert torch.allclose(get_preprocessing("none")(small), small.float() / 255)
    with pytest.raises(ConfigError, match="Res224"):
        get_preprocessing("Res224")


# --- training helpers ---------------------------------------------------------------------------


class _FixedLogits(nn.Module):
    """Returns logits stored per image, indexed by the image's first pixel."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[x[:, 0, 0, 0].round().long()]


def test_cotta_threshold_is_5pct_quantile_minus_margin() -> None:
    n = 200
    logits = torch.randn(n, 10, generator=torch.Generator().manual_seed(3)) * 3
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    conf = torch.softmax(logits, 1).max(1).values.numpy()
    expected = float(np.quantile(conf.astype(np.float64), 0.05)) - 0.05
    got = cotta_threshold(_FixedLogits(logits), images, batch_size=37)
    assert got == pytest.approx(expected, abs=1e-6)
    assert cotta_threshold(_FixedLogits(logits), images, quantile=0.5, margin=0.0) == pytest.approx(float(np.median(conf)), abs=1e-6)
    with pytest.raises(ConfigError):
        cotta_threshold(_FixedLogits(logits), images[:0])


def test_evaluate_counts_correct() -> None:
    logits = torch.eye(10)
    images = torch.arange(10, dtype=torch.float32).view(10, 1, 1, 1).expand(10, 3, 2, 2).contiguous()
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 0, 0, 0, 0])
    assert evaluate(_FixedLogits(logits), images, labels, batch_size=3) == 5


def test_augment_is_a_shifted_window_with_optional_flip() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (64, 3, 8, 8), dtype=torch.uint8)
    out = augment(x, 2, True, g)
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    flipped = 0
    for i in range(len(x)):  # test-only loop: check every sample against all 25 windows
        windows = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        plain = any(torch.equal(out[i], w) for w in windows)
        mirrored = any(torch.equal(out[i], w.flip(2)) for w in windows)
        assert plain or mirrored
        flipped += int(mirrored and not plain)
    assert 10 < flipped < 54
    assert torch.equal(augment(x, 0, False, g), x)


def test_channel_stats() -> None:
    x = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    mean, std = channel_stats(x, chunk=7)
    ref = x.double() / 255
    assert mean == pytest.approx(ref.mean((0, 2, 3)).tolist(), abs=1e-4)
    assert std == pytest.approx(ref.std((0, 2, 3), unbiased=False).tolist(), abs=1e-4)


def test_card_feature_layer_values() -> None:
    from tta.models.features import default_feature_layer

    assert default_feature_layer(resnet20()) == "forward_features"
    assert default_feature_layer(build_model("vit_patch4_32", embed_dim=32, depth=1, num_heads=2)) == "forward_head(pre_logits=True)"
    tv = build_model("torchvision:mobilenet_v3_small", num_classes=10).eval()
    assert default_feature_layer(tv) == "classifier.3"
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(extract_features(tv, x, layer="classifier.3"), extract_features(tv, x))
        net = resnet20().eval()
        assert torch.allclose(extract_features(net, x, layer="forward_features"), net.forward_features(x))
