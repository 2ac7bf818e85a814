"""RMT against independent re-derivations: the symmetric cross-entropy, the contrastive loss with source
prototypes (written out anchor by anchor), one whole step; prototypes (computation, file, checks),
source replay and warm-up, state round trip and reset, both cards, `tta build-prototypes`."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tta
from tta.adapters.rmt import (
    compute_prototypes,
    contrastive_loss,
    load_prototypes,
    nearest_prototypes,
    save_prototypes,
)
from tta.adapters.teacher import symmetric_cross_entropy_per_sample
from tta.errors import ConfigError, DataNotFoundError, InvalidInputError


def bn_net(num_classes: int = 4, dim: int = 6) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = nn.Sequential(nn.Conv2d(3, dim, 3, padding=1), nn.BatchNorm2d(dim), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(dim, num_classes))
    return model.eval()


def protos(num_classes: int = 4, dim: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(seed))


def images(n: int = 8, size: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------- the losses
def test_symmetric_cross_entropy_is_half_of_each_direction():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    ps, pt = s.softmax(1), t.softmax(1)
    want = [0.5 * -(pt[i] * ps[i].log()).sum() + 0.5 * -(ps[i] * pt[i].log()).sum() for i in range(5)]
    torch.testing.assert_close(symmetric_cross_entropy_per_sample(s, t), torch.stack(want), rtol=1e-5, atol=1e-6)


def supcon_by_anchor(z: torch.Tensor, batch: int, temperature: float) -> torch.Tensor:
    """Khosla et al.'s loss without labels, one anchor at a time: positives are the other views of
    the anchor's sample, the denominator every other row."""
    n = z.shape[0]
    losses = []
    for i in range(n):
        others = [a for a in range(n) if a != i]
        log_denominator = torch.logsumexp(torch.stack([z[i] @ z[a] / temperature for a in others]), 0)
        positives = [p for p in others if p % batch == i % batch]
        losses.append(-sum(z[i] @ z[p] / temperature - log_denominator for p in positives) / len(positives))
    return torch.stack(losses).mean()


@pytest.mark.parametrize(("batch", "views"), [(4, 3), (1, 3), (7, 2)])
def test_contrastive_loss_matches_the_anchor_by_anchor_definition(batch, views):
    z = F.normalize(torch.randn(views * batch, 5, generator=torch.Generator().manual_seed(batch)), dim=1)
    torch.testing.assert_close(contrastive_loss(z, batch, 0.1), supcon_by_anchor(z, batch, 0.1), rtol=1e-5, atol=1e-5)


def test_nearest_prototype_by_cosine_similarity():
    p = protos()
    f = torch.randn(9, 6, generator=torch.Generator().manual_seed(2))
    want = torch.stack([p[max(range(4), key=lambda k: float(F.cosine_similarity(p[k], f[i], dim=0)))] for i in range(9)])
    assert torch.equal(nearest_prototypes(f, p), want)


# ---------------------------------------------------------------------- one whole step
def test_one_step_matches_a_plain_torch_rederivation():
    """The augmentation made the identity; SGD without momentum: the student's update is -lr times
    the gradient of lambda_trg * L_st + lambda_cont * L_cont, re-derived here from the definitions;
    the teacher follows by EMA; the prediction is student + teacher logits before the update."""
    model, p, x = bn_net(), protos(), images()
    lr, m = 0.1, 0.9
    adapter = tta.adapt(copy.deepcopy(model), "rmt", seed=0, optimizer="sgd", lr=lr, momentum=0.0,
                        ema_momentum=m, lambda_cont=0.7, lambda_ce_trg=1.3)
    adapter.set_prototypes(p)
    adapter.augment.apply = lambda data, params, noise, grey_rgb=None: data.unsqueeze(0)
    projector = copy.deepcopy(adapter.projector)
    out = adapter(x)

    student = copy.deepcopy(model)
    params = dict(student.named_parameters())

    def features(inp):
        h = F.batch_norm(F.conv2d(inp, params["0.weight"], params["0.bias"], padding=1), None, None,
                         params["1.weight"], params["1.bias"], True, 0.0, 1e-5)
        return F.relu(h).mean((2, 3))

    f = features(x)
    logits = F.linear(f, params["5.weight"], params["5.bias"])
    with torch.no_grad():
        teacher = F.linear(features(x), params["5.weight"], params["5.bias"])
    torch.testing.assert_close(out, (logits + teacher).detach(), rtol=1e-5, atol=1e-5)

    def sce(a, b):
        return 0.5 * -(b.softmax(1) * a.log_softmax(1)).sum(1) + 0.5 * -(a.softmax(1) * b.log_softmax(1)).sum(1)

    l_st = (0.5 * sce(logits, teacher) + 0.5 * sce(logits, teacher)).mean()  # x' = x here
    cos = torch.stack([F.cosine_similarity(p, f[i].detach().unsqueeze(0), dim=1) for i in range(8)])  # (B, K)
    nearest = p[cos.argmax(1)]
    rows = torch.cat([nearest, f, f])  # view-major: prototypes, features, features of x'
    z = F.normalize(projector(rows), dim=1)
    l_cont = supcon_by_anchor(z, 8, 0.1)
    loss = 1.3 * l_st + 0.7 * l_cont
    names = list(params) + [f"projector.{n}" for n, _ in projector.named_parameters()]
    tensors = list(params.values()) + list(projector.parameters())
    grads = dict(zip(names, torch.autograd.grad(loss, tensors)))
    for name, q in adapter.model.named_parameters():
        want = params[name] - lr * grads[name]
        torch.testing.assert_close(q, want, rtol=1e-4, atol=1e-6, msg=name)
        teacher_q = adapter.teacher.get_parameter(name)
        torch.testing.assert_close(teacher_q, m * params[name] + (1 - m) * want, rtol=1e-4, atol=1e-6, msg=name)
    for name, q in adapter.projector.named_parameters():
        torch.testing.assert_close(q, projector.get_parameter(name) - lr * grads[f"projector.{name}"], rtol=1e-4,
                                   atol=1e-6, msg=name)


# ---------------------------------------------------------------------- prototypes
def test_compute_prototypes_are_class_means_of_batch_statistics_features(tmp_path):
    model = bn_net()
    x, y = images(12, seed=3), torch.tensor([0, 1, 2, 3] * 3)
    got = compute_prototypes(model, x, y, 4, batch_size=6)
    net = copy.deepcopy(model)
    feats = []
    for start in (0, 6):  # BatchNorm with each batch's statistics, as the adapter's model
        h = F.batch_norm(net[0](x[start : start + 6]), None, None, net[1].weight, net[1].bias, True, 0.0, 1e-5)
        feats.append(F.relu(h).mean((2, 3)))
    feats = torch.cat(feats).detach()
    want = torch.stack([feats[y == k].mean(0) for k in range(4)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    path = save_prototypes(tmp_path / "p.safetensors", got, {"card": "test"})
    loaded, meta = load_prototypes(path)
    assert torch.equal(loaded, got) and meta["card"] == "test"
    with pytest.raises(InvalidInputError, match="class"):
        compute_prototypes(model, x[:4], torch.tensor([0, 0, 1, 1]), 4)
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(DataNotFoundError):
        load_prototypes(tmp_path / "bad.safetensors")
    with pytest.raises(DataNotFoundError, match="build-prototypes"):
        load_prototypes(tmp_path / "missing.safetensors")


def test_missing_or_mismatched_prototypes_are_clear_errors_before_any_change(tmp_path):
    adapter = tta.adapt(bn_net(), "rmt", seed=0)
    before = copy.deepcopy(adapter.state_dict())
    with pytest.raises(ConfigError, match="build-prototypes"):
        adapter(images())
    for k, v in before.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, adapter.state_dict()[k]), k
    with pytest.raises(InvalidInputError, match="another card"):
        adapter.set_prototypes(protos(num_classes=10))
    path = save_prototypes(tmp_path / "p.safetensors", protos())
    configured = tta.adapt(bn_net(), "rmt", seed=0, prototypes=str(path))
    assert torch.equal(configured._prototypes, protos())


# ---------------------------------------------------------------------- source replay and warm-up
def test_source_replay_adds_the_cross_entropy_of_a_labelled_source_batch():
    x = images()
    src_x, src_y = images(20, seed=7), torch.arange(20) % 4
    plain = tta.adapt(bn_net(), "rmt", seed=0, source_batch_size=5)
    replay = tta.adapt(bn_net(), "rmt", seed=0, source_batch_size=5, lambda_ce_src=1.0)
    for a in (plain, replay):
        a.set_prototypes(protos())
    with pytest.raises(ConfigError, match="source data"):
        replay(x)
    replay.set_source_data(src_x, src_y)
    assert torch.equal(plain(x), replay(x))  # the prediction precedes the update
    moved = [not torch.equal(p, q) for p, q in zip(plain.model.parameters(), replay.model.parameters())]
    assert any(moved)
    with pytest.raises(InvalidInputError, match="labels"):
        replay.set_source_data(src_x, torch.full((20,), 4))


def test_warm_up_runs_once_and_reset_returns_to_the_warmed_up_state():
    src_x, src_y = (images(40, seed=8) * 255).to(torch.uint8), torch.arange(40) % 4
    adapter = tta.adapt(bn_net(), "rmt", seed=0, warmup_samples=30, source_batch_size=10, lr=1e-2)
    source = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    adapter.set_prototypes(protos())
    adapter.set_source_data(src_x, src_y)
    assert adapter.counters["warmup_steps"] == 3
    assert adapter.optimizer.param_groups[0]["lr"] == 1e-2  # the ramp ends at the configured rate
    warm_student = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    warm_teacher = {k: v.clone() for k, v in adapter.teacher.state_dict().items()}
    assert any(not torch.equal(warm_student[k], source[k]) for k in source)
    adapter.set_source_data(src_x, src_y)  # once only
    assert adapter.counters["warmup_steps"] == 3
    adapter(images())
    adapter.reset()
    for k, v in adapter.model.state_dict().items():
        assert torch.equal(v, warm_student[k]), k
    for k, v in adapter.teacher.state_dict().items():
        assert torch.equal(v, warm_teacher[k]), k


# ---------------------------------------------------------------------- state and cards
def test_state_round_trip_bit_exact_and_reset(tmp_path):
    xs = [images(seed=i) for i in range(4)]
    a = tta.adapt(bn_net(), "rmt", seed=2)
    a.set_prototypes(protos())
    a(xs[0]), a(xs[1])
    a.save(tmp_path / "rmt.pt")
    b = tta.adapt(bn_net(), "rmt", seed=5)
    b.set_prototypes(protos())
    b(xs[3])
    b.load(tmp_path / "rmt.pt")
    for x in xs[2:]:
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    fresh = tta.adapt(bn_net(), "rmt", seed=2)
    fresh.set_prototypes(protos())
    a.reset()
    for p, q in zip(a.projector.parameters(), fresh.projector.parameters()):
        assert torch.equal(p, q)
    torch.testing.assert_close(a(xs[0]), fresh(xs[0]), rtol=0, atol=0)


@pytest.mark.parametrize("card", ["resnet20-fmnist", "vit-fmnist"])
def test_runs_on_both_cards_with_their_shipped_prototypes(card):
    from tta.adapters.teacher import card_defaults
    from tta.models import load

    cfg = card_defaults(tta.adapters.get_adapter_class("rmt").Config, {}, card)
    assert cfg["prototypes"].endswith(f"{card}.prototypes.safetensors")
    adapter = tta.adapt(load(card), "rmt", seed=0, **cfg)
    before = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}
    out = adapter(torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (16, 10) and torch.isfinite(out).all()
    moved = [n for n, p in adapter.model.named_parameters() if not torch.equal(p, before[n])]
    assert moved
    if card == "vit-fmnist":
        assert any("norm" in n for n in moved) and any("attn" in n for n in moved)  # LayerNorm and the rest
    assert math.isfinite(float(adapter._prototypes.sum()))


@pytest.mark.data
def test_build_prototypes_cli_writes_the_card_artefact_the_adapter_finds(tmp_path):
    import yaml

    from tta.adapters.teacher import card_defaults
    from tta.cli import main
    from tta.models.checkpoint import save_state_dict, sha256_file
    from tta.streams.fashion_mnist import default_dir

    if not (default_dir() / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is not installed")
    from tta.models import build_model

    model = build_model("resnet20", num_classes=10)
    save_state_dict(model.state_dict(), tmp_path / "tiny.safetensors")
    card = {"name": "tiny", "arch": "resnet20", "num_classes": 10, "checkpoint": "tiny.safetensors",
            "sha256": sha256_file(tmp_path / "tiny.safetensors"), "input_size": [3, 32, 32],
            "dataset": "fashion-mnist"}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(card))
    rc = main(["build-prototypes", "--model", str(tmp_path / "tiny.yaml"), "--limit", "400", "--batch-size", "100"])
    written = tmp_path / "tiny.prototypes.safetensors"
    assert rc == 0 and written.is_file()
    prototypes, meta = load_prototypes(written)
    assert prototypes.shape == (10, 64) and meta["images"] == "400" and meta["card"] == "tiny"
    resolved = card_defaults(tta.adapters.get_adapter_class("rmt").Config, {"source_dataset": "card"},
                             str(tmp_path / "tiny.yaml"))
    assert resolved == {"source_dataset": "fashion-mnist", "prototypes": str(written)}


def test_cli_rule_names_the_build_command_when_a_card_has_no_prototypes(tmp_path):
    import yaml

    from tta.adapters.rmt import RmtConfig
    from tta.adapters.teacher import card_defaults
    from tta.models import build_model
    from tta.models.checkpoint import save_state_dict, sha256_file

    save_state_dict(build_model("resnet20", num_classes=10).state_dict(), tmp_path / "tiny.safetensors")
    card = {"name": "tiny", "arch": "resnet20", "num_classes": 10, "checkpoint": "tiny.safetensors",
            "sha256": sha256_file(tmp_path / "tiny.safetensors"), "input_size": [3, 32, 32]}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(card))
    with pytest.raises(ConfigError, match="tta build-prototypes --model"):
        card_defaults(RmtConfig, {}, str(tmp_path / "tiny.yaml"))
    assert card_defaults(RmtConfig, {"prototypes": "p.safetensors"}, str(tmp_path / "tiny.yaml")) == {
        "prototypes": "p.safetensors"}


def test_bench_runs_rmt_and_rotta_with_per_adapter_settings(tmp_path, monkeypatch):
    """`tta bench` (toy stream and model of tests/test_cli.py): both adapters run, configured per adapter."""
    import json

    from test_cli import ToySpec, tiny_cnn
    from tta.cli import main

    spec = ToySpec()
    monkeypatch.setattr(tta.streams, "load_spec", lambda name: spec)
    monkeypatch.setattr(tta.models, "load", lambda card, device="cpu": tiny_cnn())
    path = save_prototypes(tmp_path / "tiny.prototypes.safetensors", protos(num_classes=10, dim=16))
    rc = main(["bench", "--adapters", "rmt,rotta", "--set", f"rmt.prototypes={path}", "--set",
               "rotta.update_frequency=8", "--set", "rotta.memory_size=8", "--out", str(tmp_path / "out"),
               "--no-progress"])
    assert rc == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(results) == ["rmt", "rotta"] and all(0 <= r["mean"] <= 100 for r in results.values())
    configs = json.loads((tmp_path / "out" / "meta.json").read_text())["configs"]
    assert configs["rmt"]["prototypes"] == str(path) and configs["rotta"]["update_frequency"] == 8
