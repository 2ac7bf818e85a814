"""Adapter API and the baseline adapters (source, bn, alpha-bn, tent)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
import torchvision
from torch import nn

import tta
from tta.adapters import get_adapter_class
from tta.errors import (
    BatchTooSmallError,
    ConfigError,
    InvalidInputError,
    NoAdaptableLayerError,
    NonFiniteInputError,
    StateMismatchError,
)
from tta.layers import CalibratedBatchNorm


def small_cnn(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    )


def with_source_stats(model: nn.Module) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


def tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        elif isinstance(a[k], dict):
            assert_same_state(a[k], b[k])
        else:
            assert a[k] == b[k], k


# ---------------------------------------------------------------- registry and config

def test_registry_lists_baselines_and_rejects_unknown_names():
    names = tta.list_adapters()
    for expected in ("source", "bn", "alpha-bn", "tent"):
        assert expected in names
    with pytest.raises(ConfigError, match="valid adapters: .*tent"):
        tta.adapt(small_cnn(), "tnet")
    assert get_adapter_class("alpha_bn") is get_adapter_class("alpha-bn")


def test_unknown_config_key_and_bad_values_are_rejected():
    with pytest.raises(ConfigError, match="unknown config key.*'lrr'.*valid keys"):
        tta.adapt(small_cnn(), "tent", lrr=0.1)
    with pytest.raises(ConfigError, match="source_weight"):
        tta.adapt(small_cnn(), "alpha-bn", source_weight=1.5)
    with pytest.raises(ConfigError, match="unknown preset"):
        tta.adapt(small_cnn(), "tent", preset="mnist")
    with pytest.raises(ConfigError, match="optimizer must be one of"):
        tta.adapt(small_cnn(), "tent", optimizer="rmsprop")


def test_presets_override_paper_defaults():
    cfg = tta.adapter_config("tent", preset="imagenet")
    assert (cfg.optimizer, cfg.lr, cfg.momentum) == ("sgd", 2.5e-4, 0.9)
    adapted = tta.adapt(small_cnn(), "tent", preset="imagenet")
    assert isinstance(adapted.optimizer, torch.optim.SGD)
    assert isinstance(tta.adapt(small_cnn(), "tent", preset="cifar10").optimizer, torch.optim.Adam)


def test_cli_assignments_are_typed():
    cls = get_adapter_class("tent").Config
    parsed = cls.parse_assignments(["lr=0.01", "steps=2", "episodic=true", "betas=0.8,0.99"])
    assert parsed == {"lr": 0.01, "steps": 2, "episodic": True, "betas": (0.8, 0.99)}
    with pytest.raises(ConfigError, match="unknown config key 'nope'"):
        cls.parse_assignments(["nope=1"])
    with pytest.raises(ConfigError, match="expected float"):
        cls.parse_assignments(["lr=fast"])


# ---------------------------------------------------------------- acceptance: tent/bn/alpha-bn on timm resnet18

def test_tent_on_timm_resnet18_changes_only_bn_affine():
    model = timm.create_model("resnet18", num_classes=10)
    adapted = tta.adapt(model, "tent")
    before = tensors(adapted.model)
    adapted(torch.rand(16, 3, 32, 32))
    after = tensors(adapted.model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    affine = {
        f"{name}.{p}"
        for name, m in adapted.model.named_modules()
        if isinstance(m, CalibratedBatchNorm)
        for p in ("weight", "bias")
    }
    assert changed, "tent changed nothing"
    assert changed <= affine, f"non-affine tensors changed: {sorted(changed - affine)[:5]}"
    # every BN affine parameter with a non-zero gradient moved (timm zero-inits the last BN of each
    # block, which blocks the gradient of the BN before it; those legitimately stay put)
    assert len(changed) >= 20
    trainable = {id(p) for g in adapted.optimizer.param_groups for p in g["params"]}
    assert trainable == {id(p) for n, p in adapted.model.named_parameters() if n in affine}


def test_bn_changes_no_parameter_and_uses_batch_statistics():
    model = with_source_stats(timm.create_model("resnet18", num_classes=10))
    reference = copy.deepcopy(model)
    adapted = tta.adapt(model, "bn")
    before = tensors(adapted.model)
    x = torch.rand(8, 3, 32, 32)
    out = adapted(x)
    assert_same_state(before, tensors(adapted.model))
    # same as the source model put in training mode (batch statistics) without running-stat updates
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
            m.momentum = 0.0
    with torch.no_grad():
        expected = reference(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("factory", [lambda: timm.create_model("resnet18", num_classes=10), small_cnn])
def test_alpha_bn_endpoints_equal_source_and_bn(factory):
    torch.manual_seed(0)
    base = with_source_stats(factory())
    x = torch.rand(8, 3, 32, 32) * 1.5 + 0.2  # shifted inputs: batch statistics differ from source
    out = {}
    for name, kwargs in [("source", {}), ("bn", {}), ("alpha1", {"source_weight": 1.0}), ("alpha0", {"source_weight": 0.0})]:
        adapter = "alpha-bn" if name.startswith("alpha") else name
        out[name] = tta.adapt(copy.deepcopy(base), adapter, **kwargs)(x)
    torch.testing.assert_close(out["alpha1"], out["source"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["alpha0"], out["bn"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out["source"], out["bn"], atol=1e-3)


def test_alpha_bn_mixes_statistics_with_biased_batch_variance():
    a = 0.7
    bn = with_source_stats(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    conv, layer = bn[0], bn[1]
    x = torch.rand(5, 3, 6, 6)
    with torch.no_grad():
        h = conv(x).double()
    mean = h.mean((0, 2, 3))
    var = h.var((0, 2, 3), unbiased=False)
    mix_m = a * layer.running_mean.double() + (1 - a) * mean
    mix_v = a * layer.running_var.double() + (1 - a) * var
    expected = (h - mix_m.view(1, -1, 1, 1)) / torch.sqrt(mix_v.view(1, -1, 1, 1) + layer.eps)
    expected = expected * layer.weight.double().view(1, -1, 1, 1) + layer.bias.double().view(1, -1, 1, 1)
    out = tta.adapt(bn, "alpha-bn", source_weight=a)(x)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_alpha_bn_batch_variance_is_the_biased_estimate_not_the_unbiased_one():
    """Where n is small (3 samples of 1x1 maps) the two estimates differ by n / (n - 1) = 1.5: the
    output is the biased formula's, and measurably not the peer's unbiased one."""
    a = 0.5
    layer = with_source_stats(nn.Sequential(nn.BatchNorm2d(4)))[0]
    x = torch.randn(3, 4, 1, 1, generator=torch.Generator().manual_seed(0)).double()

    def mixed(var_batch: torch.Tensor) -> torch.Tensor:
        m = a * layer.running_mean.double() + (1 - a) * x.mean((0, 2, 3))
        v = a * layer.running_var.double() + (1 - a) * var_batch
        y = (x - m.view(1, -1, 1, 1)) / torch.sqrt(v.view(1, -1, 1, 1) + layer.eps)
        return y * layer.weight.double().view(1, -1, 1, 1) + layer.bias.double().view(1, -1, 1, 1)

    out = tta.adapt(nn.Sequential(layer), "alpha-bn", source_weight=a)(x.float()).double()
    torch.testing.assert_close(out, mixed(x.var((0, 2, 3), unbiased=False)), rtol=1e-5, atol=1e-5)
    assert (out - mixed(x.var((0, 2, 3), unbiased=True))).abs().max() > 1e-2


# ---------------------------------------------------------------- acceptance: TENT vs an independent derivation

def test_tent_one_step_matches_closed_form_entropy_gradient():
    """Model: BN1d feeding softmax directly, so dH/dgamma and dH/dbeta have a closed form.

    logits z = gamma * xhat + beta, p = softmax(z), H = -sum p log p, dH/dz_j = -p_j (log p_j + H).
    Loss = mean_n H_n. One SGD step: theta <- theta - lr * dLoss/dtheta.
    """
    c, n, lr = 5, 12, 0.5
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(n, c)) * 2.0 + 0.5
    gamma = rng.uniform(0.5, 1.5, size=c)
    beta = rng.normal(size=c) * 0.1
    eps = 1e-5

    bn = nn.BatchNorm1d(c, eps=eps)
    bn.weight.data = torch.tensor(gamma, dtype=torch.float32)
    bn.bias.data = torch.tensor(beta, dtype=torch.float32)
    model = nn.Sequential(nn.Flatten(), bn).eval()
    adapted = tta.adapt(model, "tent", optimizer="sgd", lr=lr, momentum=0.0)
    x = torch.tensor(feats, dtype=torch.float32).view(n, c, 1, 1)
    logits = adapted(x)

    # independent derivation in float64 numpy
    xhat = (feats - feats.mean(0)) / np.sqrt(feats.var(0) + eps)
    z = gamma * xhat + beta
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    h = -(p * np.log(p)).sum(1, keepdims=True)
    dz = -p * (np.log(p) + h) / n
    grad_beta = dz.sum(0)
    grad_gamma = (dz * xhat).sum(0)

    np.testing.assert_allclose(logits.numpy(), z, rtol=1e-4, atol=1e-4)  # prediction before the update
    layer = adapted.model[1]
    np.testing.assert_allclose(layer.weight.detach().numpy(), gamma - lr * grad_gamma, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.bias.detach().numpy(), beta - lr * grad_beta, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- other architectures

def test_torchvision_resnet_and_layernorm_vit():
    tv = with_source_stats(torchvision.models.resnet18(num_classes=10))
    for name in ("bn", "alpha-bn", "tent"):
        out = tta.adapt(copy.deepcopy(tv), name)(torch.rand(4, 3, 32, 32))
        assert out.shape == (4, 10) and torch.isfinite(out).all()
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=10)
    adapted = tta.adapt(vit, "tent")
    before = tensors(adapted.model)
    adapted(torch.rand(1, 3, 32, 32))  # LayerNorm only: a batch of one adapts
    changed = [k for k, v in tensors(adapted.model).items() if not torch.equal(v, before[k])]
    assert changed and all(".norm" in k or k.startswith("norm") for k in changed)


def test_tent_on_the_vit_card_trains_exactly_the_layernorm_affine_parameters():
    """TENT-LN, the ViT table's baseline: the trainable set is every LayerNorm weight and bias of the
    shipped ViT card (no BatchNorm there), the model stays in eval mode, and one step is Adam's first
    step on the entropy gradient of those parameters: p - lr * g / (|g| + eps), re-derived here."""
    import tta.models as models

    source = models.load("vit-fmnist")
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    adapted = tta.adapt(source, "tent", preset="cifar10")
    ln_names = {f"{name}.{p}" for name, m in adapted.model.named_modules() if isinstance(m, nn.LayerNorm)
                for p in ("weight", "bias")}
    trainable = {n for n, p in adapted.model.named_parameters() if p.requires_grad}
    depth = len(source.model.blocks)  # card models wrap the network in Normalized(model)
    assert trainable == ln_names and len(ln_names) == 2 * (2 * depth + 1)
    assert not adapted.model.training and not any(isinstance(m, nn.BatchNorm2d) for m in adapted.model.modules())

    ref = copy.deepcopy(source).eval()
    for n, p in ref.named_parameters():
        p.requires_grad_(n in ln_names)
    logits = ref(x)
    entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()
    grads = dict(zip([n for n, p in ref.named_parameters() if p.requires_grad],
                     torch.autograd.grad(entropy, [p for p in ref.parameters() if p.requires_grad])))
    before = tensors(adapted.model)
    out = adapted(x)
    np.testing.assert_allclose(out.detach().numpy(), logits.detach().numpy(), rtol=1e-4, atol=1e-5)
    lr, eps = adapted.config.lr, 1e-8
    after = tensors(adapted.model)
    for name, value in after.items():
        if name in grads:
            g = grads[name]
            np.testing.assert_allclose(value.numpy(), (before[name] - lr * g / (g.abs() + eps)).numpy(),
                                       rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(value, before[name]), name


def test_models_without_adaptable_layers_fail_clearly():
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    for name in ("bn", "alpha-bn"):
        with pytest.raises(NoAdaptableLayerError, match="no BatchNorm layer"):
            tta.adapt(copy.deepcopy(plain), name)
    with pytest.raises(NoAdaptableLayerError, match="no normalisation layer"):
        tta.adapt(plain, "tent")
    with pytest.raises(InvalidInputError, match="nn.Module"):
        tta.adapt("resnet18", "bn")  # type: ignore[arg-type]


# ---------------------------------------------------------------- bad input leaves the state untouched

BAD_BATCHES = {
    "rank": (torch.rand(3, 32, 32), InvalidInputError, "single image"),
    "channels": (torch.rand(4, 1, 32, 32), InvalidInputError, "3 input channel"),
    "dtype": ((torch.rand(4, 3, 32, 32) * 255).to(torch.uint8), InvalidInputError, "floating-point"),
    "empty": (torch.rand(0, 3, 32, 32), InvalidInputError, "empty batch"),
    "nan": (torch.full((4, 3, 32, 32), float("nan")), NonFiniteInputError, "NaN/Inf"),
    "inf": (torch.rand(4, 3, 32, 32).index_fill_(0, torch.tensor([2]), float("inf")), NonFiniteInputError, "1 of 4"),
    "not a tensor": (np.zeros((4, 3, 32, 32), np.float32), InvalidInputError, "torch.Tensor"),
}


@pytest.mark.parametrize("adapter", ["source", "bn", "alpha-bn", "tent"])
@pytest.mark.parametrize("case", sorted(BAD_BATCHES))
def test_rejected_batch_leaves_state_unchanged(adapter, case):
    adapted = tta.adapt(with_source_stats(small_cnn()), adapter, seed=0)
    adapted(torch.rand(8, 3, 32, 32))  # one real step first, so optimizer state exists
    before = adapted.state_dict()
    x, exc, msg = BAD_BATCHES[case]
    with pytest.raises(exc, match=msg):
        adapted(x)
    assert_same_state(before, adapted.state_dict())


@pytest.mark.parametrize("adapter", ["bn", "alpha-bn", "tent"])
def test_batch_of_one_uses_source_statistics_fallback_or_raises(adapter):
    base = with_source_stats(small_cnn())
    adapted = tta.adapt(copy.deepcopy(base), adapter)
    adapted(torch.rand(8, 3, 32, 32))
    before = adapted.state_dict()
    x = torch.rand(1, 3, 32, 32)
    out = adapted(x)
    assert_same_state({k: v for k, v in before.items() if k != "_extra_state"},
                      {k: v for k, v in adapted.state_dict().items() if k != "_extra_state"})
    assert adapted.counters["small_batches"] == 1
    if adapter != "tent":  # tent's affine parameters moved on the first batch
        torch.testing.assert_close(out, tta.adapt(copy.deepcopy(base), "source")(x))
    strict = tta.adapt(copy.deepcopy(base), adapter, small_batch="raise")
    with pytest.raises(BatchTooSmallError, match="too small to estimate batch statistics"):
        strict(x)


def test_nonfinite_loss_is_not_applied():
    adapted = tta.adapt(with_source_stats(small_cnn()), "tent")
    adapted.model[-1].weight.data.fill_(1e38)  # logits overflow -> non-finite entropy
    before = tensors(adapted.model)
    adapted(torch.rand(8, 3, 32, 32))
    assert adapted.counters["skipped_nonfinite_loss"] == 1
    assert_same_state(before, tensors(adapted.model))


# ---------------------------------------------------------------- state: save/load, reset, fork

def test_save_load_round_trip_is_bit_exact(tmp_path):
    base = with_source_stats(small_cnn())
    a = tta.adapt(copy.deepcopy(base), "tent", seed=3)
    for _ in range(3):
        a(torch.rand(8, 3, 32, 32))
    path = a.save(tmp_path / "state.pt")
    b = tta.adapt(copy.deepcopy(base), "tent", seed=99)
    b.load(path)
    assert_same_state(a.state_dict(), b.state_dict())
    x = torch.rand(8, 3, 32, 32)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert_same_state(a.state_dict(), b.state_dict())


def test_loading_foreign_state_fails_clearly(tmp_path):
    a = tta.adapt(with_source_stats(small_cnn()), "tent")
    a(torch.rand(8, 3, 32, 32))
    path = a.save(tmp_path / "state.pt")
    other_model = tta.adapt(with_source_stats(small_cnn(num_classes=7)), "tent")
    with pytest.raises(StateMismatchError, match="different model"):
        other_model.load(path)
    other_adapter = tta.adapt(with_source_stats(small_cnn()), "bn")
    with pytest.raises(StateMismatchError, match="saved by adapter 'tent'"):
        other_adapter.load(path)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(StateMismatchError, match="not a readable adapter state"):
        a.load(truncated)
    with pytest.raises(StateMismatchError, match="no adapter state file"):
        a.load(tmp_path / "missing.pt")


def test_save_is_atomic_and_keeps_old_state_on_failure(tmp_path, monkeypatch):
    a = tta.adapt(with_source_stats(small_cnn()), "tent")
    path = a.save(tmp_path / "state.pt")
    good = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        a.save(path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_reset_restores_source_state_and_episodic_mode():
    base = with_source_stats(small_cnn())
    a = tta.adapt(copy.deepcopy(base), "tent")
    fresh = a.state_dict()
    x = torch.rand(8, 3, 32, 32)
    first = a(x)
    a(x)
    a.reset()
    model_keys = [k for k in fresh if k != "_extra_state"]
    for k in model_keys:
        assert torch.equal(fresh[k], a.state_dict()[k]), k
    assert a.optimizer.state == {}
    torch.testing.assert_close(a(x), first, rtol=0, atol=0)
    episodic = tta.adapt(copy.deepcopy(base), "tent", episodic=True)
    torch.testing.assert_close(episodic(x), first)
    torch.testing.assert_close(episodic(x), first)


def test_fork_is_independent_and_shares_frozen_weights():
    a = tta.adapt(with_source_stats(small_cnn()), "tent")
    b = a.fork()
    conv_a, conv_b = a.model[0].weight, b.model[0].weight
    assert conv_a.data_ptr() == conv_b.data_ptr()  # frozen conv shared
    assert a.model[1].weight.data_ptr() != b.model[1].weight.data_ptr()  # trainable copied
    before = tensors(a.model)
    b(torch.rand(8, 3, 32, 32) * 3)
    assert_same_state(before, tensors(a.model))
    assert not torch.equal(a.model[1].bias, b.model[1].bias)


def test_subpackages_are_reachable_from_the_top_level_package():
    import subprocess
    import sys

    code = "import tta; print(tta.models.DEFAULT_CARD, tta.streams.DEFAULT_SPEC, callable(tta.engine.run_stream))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["resnet20-fmnist", "fmnist-c-continual", "True"]
