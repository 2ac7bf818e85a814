"""The contract for the entropy-family adapters (EATA, ETA, SAR, DeYO, ROID): registry, presets,
CLI configuration, bad input, save/load round trip, reset, and runs on the shipped CNN and ViT cards."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import tta
from engine_helpers import tiny_cnn
from tta.adapters import get_adapter_class
from tta.adapters.eata import compute_fisher
from tta.errors import InvalidInputError, NonFiniteInputError

NAMES = ["eata", "eta", "sar", "deyo", "roid"]


# The tiny random CNN is unsure of everything (entropy 1.4-1.7 of ln 10 = 2.3): margins that let
# the selection rules pick samples, so that the contract tests see real updates.
LOOSE = {
    "eata": {"margin_e0": 0.75, "d_margin": 1.5},
    "eta": {"margin_e0": 0.75, "d_margin": 1.5},
    "sar": {"margin_e0": 0.75, "reset_constant": 0.0},
    "deyo": {"margin": 0.75, "margin_e0": 0.75, "plpd_threshold": -1.0},
    "roid": {},
}


def build(name: str, model: torch.nn.Module, **cfg) -> tta.Adapter:
    adapter = tta.adapt(model, name, **{**LOOSE[name], **cfg})
    if name == "eata":
        adapter.set_fisher(compute_fisher(model, torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(9)),
                                          batch_size=8))
    return adapter


def batches(n: int = 4, b: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(b, 3, 8, 8, generator=g) * 0.6 + 0.2 * i).clamp(0, 1) for i in range(n)]


def same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        elif isinstance(a[k], dict):
            same_state(a[k], b[k])
        else:
            assert a[k] == b[k], k


# (key, expected value per preset) from the reference library's cfgs/{cifar10_c,cifar100_c,imagenet_c}/*.yaml
PRESETS = {
    "eata": [("d_margin", (0.4, 0.1, 0.05)), ("fisher_alpha", (1.0, 1.0, 2000.0)), ("optimizer", ("adam", "adam", "sgd")),
             ("lr", (1e-3, 1e-3, 2.5e-4))],
    "eta": [("d_margin", (0.4, 0.1, 0.05)), ("lr", (1e-3, 1e-3, 2.5e-4))],
    "sar": [("optimizer", ("sgd", "sgd", "sgd")), ("lr", (1e-3, 1e-3, 2.5e-4)), ("reset_constant", (0.2, 0.2, 0.2))],
    "deyo": [("plpd_threshold", (0.2, 0.2, 0.2)), ("margin", (0.5, 0.5, 0.5)), ("patch_len", (4, 4, 4)),
             ("optimizer", ("adam", "adam", "sgd"))],
    "roid": [("momentum_src", (0.99, 0.99, 0.99)), ("temperature", (1 / 3, 1 / 3, 1 / 3)),
             ("optimizer", ("adam", "adam", "sgd")), ("lr", (1e-3, 1e-3, 2.5e-4))],
}


@pytest.mark.parametrize("name", NAMES)
def test_registered_with_reference_presets_and_cli_configurable(name):
    from tta.cli.bench import select_adapters

    assert name in tta.list_adapters() and name in select_adapters("all")
    for i, preset in enumerate(("cifar10", "cifar100", "imagenet")):
        cfg = tta.adapter_config(name, preset=preset)
        for key, values in PRESETS[name]:
            assert getattr(cfg, key) == pytest.approx(values[i]) if isinstance(values[i], float) else \
                getattr(cfg, key) == values[i], (preset, key)
        if cfg.optimizer == "sgd" and name != "sar":
            assert cfg.nesterov and cfg.momentum == 0.9  # the library's SGD default
    parsed = get_adapter_class(name).Config.parse_assignments(["lr=5e-4", "steps=2", "seed=3"])
    assert parsed == {"lr": 5e-4, "steps": 2, "seed": 3}
    cfg = tta.adapter_config(name, **parsed)
    assert cfg.lr == 5e-4 and cfg.steps == 2


def test_method_specific_cli_keys_are_typed():
    assert get_adapter_class("sar").Config.parse_assignments(["excluded=layer4,norm", "rho=0.1"]) == \
        {"excluded": ("layer4", "norm"), "rho": 0.1}
    assert get_adapter_class("roid").Config.parse_assignments(["use_consistency=false", "prior_on=probs"]) == \
        {"use_consistency": False, "prior_on": "probs"}
    assert get_adapter_class("deyo").Config.parse_assignments(["aug_type=pixel", "plpd_threshold=0.3"]) == \
        {"aug_type": "pixel", "plpd_threshold": 0.3}
    assert get_adapter_class("eata").Config.parse_assignments(["fisher=resnet20-fmnist", "fisher_alpha=0"]) == \
        {"fisher": "resnet20-fmnist", "fisher_alpha": 0.0}
    with pytest.raises(tta.errors.ConfigError, match="aug_type"):
        tta.adapter_config("deyo", aug_type="rotate")


BAD = {
    "rank": (torch.rand(3, 8, 8), InvalidInputError),
    "channels": (torch.rand(4, 1, 8, 8), InvalidInputError),
    "dtype": ((torch.rand(4, 3, 8, 8) * 255).to(torch.uint8), InvalidInputError),
    "nan": (torch.rand(4, 3, 8, 8).index_fill_(0, torch.tensor([1]), float("nan")), NonFiniteInputError),
    "not a tensor": (np.zeros((4, 3, 8, 8), np.float32), InvalidInputError),
}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", sorted(BAD))
def test_rejected_batch_leaves_state_unchanged(name, case):
    adapter = build(name, tiny_cnn(), seed=0)
    for x in batches(2):
        adapter(x)
    before = copy.deepcopy(adapter.state_dict())
    x, exc = BAD[case]
    with pytest.raises(exc):
        adapter(x)
    same_state(before, adapter.state_dict())


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip_is_bit_exact(name, tmp_path):
    xs = batches(5)
    a = build(name, tiny_cnn(), seed=5, lr=0.05)
    for x in xs[:2]:
        a(x)
    path = a.save(tmp_path / f"{name}.pt")
    b = build(name, tiny_cnn(), seed=99, lr=0.05)
    b.load(path)
    same_state(a.state_dict(), b.state_dict())
    for x in xs[2:]:  # continuing after the load == continuing without saving
        torch.testing.assert_close(b(x), a(x), atol=0, rtol=0)
    same_state(a.state_dict(), b.state_dict())
    moved = [k for k, v in a.model.state_dict().items() if not torch.equal(v, tiny_cnn().state_dict()[k])]
    assert moved, f"{name} never adapted in this test"


@pytest.mark.parametrize("name", NAMES)
def test_reset_restores_the_source_state(name):
    xs = batches(3)
    fresh = build(name, tiny_cnn(), seed=1, lr=0.05)
    first = fresh(xs[0])
    a = build(name, tiny_cnn(), seed=1, lr=0.05)
    for x in xs:
        a(x)
    a.reset()
    assert not a.optimizer.state
    torch.testing.assert_close(a(xs[0]), first, atol=0, rtol=0)


@pytest.fixture(scope="module")
def shifted_fmnist() -> torch.Tensor:
    from tta.streams import corrupt, load_fashion_mnist

    images, _ = load_fashion_mnist("test")
    shifted = corrupt(images[:128], "gaussian_noise", 5, seed=0)
    return torch.from_numpy(shifted).permute(0, 3, 1, 2).float().div(255)


@pytest.mark.data
@pytest.mark.parametrize("card", ["resnet20-fmnist", "vit-fmnist"])
@pytest.mark.parametrize("name", NAMES)
def test_runs_on_the_shipped_cards_training_only_norm_parameters(name, card, shifted_fmnist):
    from tta.models import load

    cfg = {"fisher": card} if name == "eata" else {}
    adapter = tta.adapt(load(card), name, seed=0, **cfg)
    before = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    for x in shifted_fmnist.split(64):
        out = adapter(x)
        assert out.shape == (64, 10) and torch.isfinite(out).all()
    changed = sorted(k for k, v in adapter.model.state_dict().items() if not torch.equal(v, before[k]))
    assert changed, f"{name} did not adapt on {card}"
    assert set(changed) <= set(adapter.norm_param_names)
    kinds = {type(m).__name__ for n, m in adapter.model.named_modules() if f"{n}.weight" in adapter.norm_param_names}
    assert kinds == ({"CalibratedBatchNorm"} if card == "resnet20-fmnist" else {"LayerNorm"})


@pytest.mark.parametrize("name", NAMES)
def test_fork_is_independent(name):
    a = build(name, tiny_cnn(), seed=2, lr=0.05)
    a(batches(1)[0])
    before = copy.deepcopy(a.state_dict())
    b = a.fork()
    for x in batches(2, seed=4):
        b(x)
    same_state(before, a.state_dict())
    assert any(not torch.equal(v, before[k]) for k, v in b.state_dict().items() if k != "_extra_state")


def test_cli_bench_runs_the_family_with_per_adapter_settings(monkeypatch, tmp_path):
    import json
    from types import SimpleNamespace

    from engine_helpers import tensor_stream
    from tta.cli import main

    def build_stream(batch_size=None, n_per_domain=None, seed=None, data_dir=None):
        stream = tensor_stream({"a": 32, "b": 32}, batch_size or 16)
        stream.reset = "never"
        return stream

    spec = SimpleNamespace(name="toy", dataset="toy", num_classes=10, batch_size=16, n_per_domain=32, seed=1,
                           reset="never", preset="cifar10",
                           build=build_stream)
    monkeypatch.setattr(tta.streams, "load_spec", lambda name: spec)
    monkeypatch.setattr(tta.models, "load", lambda card, device="cpu": tiny_cnn())
    argv = ["bench", "--adapters", "eata,eta,sar,deyo,roid", "--no-progress", "--out", str(tmp_path),
            "--set", "eata.fisher_alpha=0", "--set", "sar.rho=0.1", "--set", "roid.use_consistency=false",
            "--set", "deyo.aug_type=pixel", "--set", "margin_e0=0.7"]
    assert main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results) == ["eata", "eta", "sar", "deyo", "roid"]
    configs = json.loads((tmp_path / "meta.json").read_text())["configs"]
    assert configs["sar"]["rho"] == 0.1 and configs["roid"]["use_consistency"] is False
    assert configs["deyo"]["aug_type"] == "pixel" and configs["eata"]["fisher_alpha"] == 0.0
    assert configs["eta"]["margin_e0"] == configs["sar"]["margin_e0"] == configs["deyo"]["margin_e0"] == 0.7
    assert configs["eata"]["fisher"].endswith(f"{tta.models.DEFAULT_CARD}.fisher.safetensors")  # the card's file
    assert configs["sar"]["optimizer"] == "sgd" and configs["eta"]["optimizer"] == "adam"  # cifar10 preset


@pytest.mark.parametrize("name,key,bad", [("eta", "model_probs", torch.tensor([0.5, float("nan")])),
                                          ("roid", "class_probs", -torch.ones(10)),
                                          ("sar", "loss_average", float("inf")),
                                          ("eata", "model_probs", torch.ones(2, 5))])
def test_bad_saved_entries_are_refused_before_anything_is_applied(name, key, bad):
    from tta.errors import StateMismatchError

    a = build(name, tiny_cnn(), seed=1, lr=0.05)
    for x in batches(2):
        a(x)
    state = copy.deepcopy(a.state_dict())
    state["_extra_state"][key] = bad
    b = build(name, tiny_cnn(), seed=1, lr=0.05)
    b(batches(1, seed=7)[0])
    before = copy.deepcopy(b.state_dict())
    with pytest.raises(StateMismatchError, match=key):
        b.load_state_dict(state)
    same_state(before, b.state_dict())
