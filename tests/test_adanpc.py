"""AdaNPC: kNN vote over a bounded feature memory, reset, state, composition with BN adapters."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import tta
from tta.adapters.adanpc import (
    AdaNPC,
    KnnMemory,
    build_source_memory,
    load_memory,
    save_memory,
)
from tta.errors import ConfigError, DataNotFoundError, InvalidInputError
from tta.ops import reference


def small_cnn(num_classes: int = 4) -> nn.Module:
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
    )
    return net.eval()


def source_memory(model, n=64, num_classes=4):
    x = torch.rand(n, 3, 8, 8)
    y = torch.arange(n) % num_classes
    return build_source_memory(model, x, y, batch_size=16)


def make(model=None, **cfg) -> AdaNPC:
    model = model or small_cnn()
    feats, labels = source_memory(model)
    adapter = tta.adapt(model, "adanpc", **cfg)
    adapter.set_source_memory(feats, labels, 4)
    return adapter


def test_prediction_is_the_knn_vote_of_the_source_memory():
    adapter = make(k=5, temperature=0.2)
    x = torch.rand(6, 3, 8, 8)
    feats_mem, labels_mem = adapter.memory.rows()
    feats_mem, labels_mem = feats_mem.clone(), labels_mem.clone()
    probs = adapter(x)
    with torch.no_grad():
        f = F.normalize(adapter.model[:5](x), dim=1)
    want = reference.knn_vote(f, feats_mem, labels_mem, 4, 5, 0.2, "ip")[0]
    torch.testing.assert_close(probs, want, rtol=1e-4, atol=1e-5)
    assert adapter.output_kind == "probs"
    torch.testing.assert_close(probs.sum(1), torch.ones(6))


def test_confident_features_are_appended_and_reset_truncates():
    adapter = make(beta=0.0)
    n_source = adapter.memory.num_source
    probs = adapter(torch.rand(5, 3, 8, 8))
    assert adapter.memory.size == n_source + 5
    _, labels = adapter.memory.rows()
    assert torch.equal(labels[n_source:], probs.argmax(1))
    adapter(torch.rand(3, 3, 8, 8))
    assert adapter.memory.num_test == 8
    adapter.reset()
    assert adapter.memory.size == n_source and adapter.memory.num_test == 0


def test_beta_filters_unconfident_features():
    adapter = make(beta=1.01)  # nothing can be that confident
    adapter(torch.rand(5, 3, 8, 8))
    assert adapter.memory.num_test == 0


@pytest.mark.parametrize("class_balanced", [False, True])
def test_memory_stays_within_capacity_over_a_long_stream(class_balanced):
    adapter = make(capacity=100, beta=0.0, class_balanced=class_balanced, storage_dtype="float16")
    n_source = adapter.memory.num_source
    source_rows = adapter.memory.rows()[0][:n_source].clone()
    for step in range(40):  # 40 batches of 7 = 280 test features through 36 free rows
        adapter(torch.rand(7, 3, 8, 8) + step % 3)
        assert adapter.memory.size <= 100
    mem = adapter.memory
    assert mem.size == 100 and mem.num_test == 36
    assert torch.equal(mem.rows()[0][:n_source], source_rows), "source part must stay pinned"
    assert mem.features.dtype == torch.float16
    stamps = mem.stamps[n_source : mem.size]
    assert stamps.unique().numel() == 36
    if not class_balanced:  # FIFO: exactly the 36 most recent entries
        assert sorted(stamps.tolist()) == list(range(280 - 36, 280))


def test_fifo_and_class_balanced_eviction_rules():
    feats = F.normalize(torch.randn(2, 4), dim=1)
    mem = KnnMemory(feats, torch.tensor([0, 1]), num_classes=3, capacity=8)
    new = F.normalize(torch.randn(6, 4), dim=1)
    mem.add(new, torch.tensor([0, 0, 0, 0, 1, 2]))
    mem.add(new[:2], torch.tensor([2, 2]))  # FIFO drops the two oldest (stamps 0, 1)
    assert sorted(mem.stamps[2:8].tolist()) == [2, 3, 4, 5, 6, 7]

    bal = KnnMemory(feats, torch.tensor([0, 1]), num_classes=3, capacity=8, class_balanced=True)
    bal.add(new, torch.tensor([0, 0, 0, 0, 1, 2]))
    bal.add(new[:2], torch.tensor([2, 1]))  # class 0 has most test entries: its two oldest go
    labels, stamps = bal.labels[2:8], bal.stamps[2:8]
    assert sorted(stamps[labels == 0].tolist()) == [2, 3]
    assert torch.bincount(labels, minlength=3).tolist() == [2, 2, 2]


def test_unbounded_memory_grows_like_the_reference():
    adapter = make(beta=0.0)
    for _ in range(30):
        adapter(torch.rand(50, 3, 8, 8))
    assert adapter.memory.num_test == 1500


def test_state_dict_round_trip_covers_the_memory(tmp_path):
    adapter = make(beta=0.0, capacity=90)
    adapter(torch.rand(9, 3, 8, 8))
    path = adapter.save(tmp_path / "state.pt")
    other = make(beta=0.0, capacity=90)
    other.load(path)
    assert other.memory.size == adapter.memory.size
    assert torch.equal(other.memory.rows()[0], adapter.memory.rows()[0])
    x = torch.rand(4, 3, 8, 8)
    torch.testing.assert_close(other(x), adapter(x))
    fork = adapter.fork()
    fork(torch.rand(3, 3, 8, 8))
    assert fork.memory.size != adapter.memory.size or fork.memory.next_stamp != adapter.memory.next_stamp


def test_memory_file_round_trip_and_validation(tmp_path):
    model = small_cnn()
    feats, labels = source_memory(model)
    path = save_memory(tmp_path / "m.memory.safetensors", feats, labels, 4, {"card": "test"})
    f2, l2, c, meta = load_memory(path)
    assert c == 4 and meta["card"] == "test" and torch.equal(l2, labels)
    torch.testing.assert_close(f2.norm(dim=1), torch.ones(len(f2)))
    adapter = tta.adapt(model, "adanpc", memory=str(path))
    assert adapter.memory.num_source == 64
    with pytest.raises(DataNotFoundError):
        load_memory(tmp_path / "missing.memory.safetensors")
    (tmp_path / "bad.memory.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DataNotFoundError):
        load_memory(tmp_path / "bad.memory.safetensors")
    with pytest.raises(InvalidInputError, match="labels"):
        save_memory(tmp_path / "x.safetensors", feats, labels + 4, 4)


def test_clear_errors():
    adapter = tta.adapt(small_cnn(), "adanpc")
    with pytest.raises(ConfigError, match="no source memory"):
        adapter(torch.rand(2, 3, 8, 8))
    with pytest.raises(ConfigError, match="capacity"):
        make(capacity=10)  # smaller than the 64 source rows
    with pytest.raises(ConfigError):
        tta.adapt(small_cnn(), "adanpc", k=0)
    adapter = make()
    adapter.set_source_memory(torch.randn(10, 5), torch.zeros(10, dtype=torch.long), 4)
    with pytest.raises(InvalidInputError, match="dims"):
        adapter(torch.rand(2, 3, 8, 8))


@pytest.mark.parametrize("norm", ["bn", "alpha-bn"])
def test_composes_with_normalisation_adapters(norm):
    model = small_cnn()
    adapter = make(model, norm=norm, source_weight=0.5, beta=0.0)
    x = torch.rand(6, 3, 8, 8) * 2
    probs = adapter(x)
    # the features come from the recalibrated network
    calibrated = tta.adapt(small_cnn(), norm, **({"source_weight": 0.5} if norm == "alpha-bn" else {}))
    with torch.no_grad():
        f = F.normalize(calibrated.model[:5](x), dim=1)
    assert torch.allclose(F.normalize(adapter.memory.rows()[0][-6:].float(), dim=1), f, atol=1e-5)
    assert probs.shape == (6, 4)
    # one-image batches fall back to source statistics and do not touch the memory
    size = adapter.memory.size
    adapter(torch.rand(1, 3, 8, 8))
    assert adapter.memory.size == size and adapter.counters["small_batches"] == 1


def test_works_on_timm_models_via_pooled_features():
    model = timm.create_model("resnet10t", num_classes=4, pretrained=False).eval()
    feats, labels = build_source_memory(model, torch.rand(8, 3, 32, 32), torch.arange(8) % 4)
    assert feats.shape == (8, model.num_features)
    adapter = tta.adapt(model, "adanpc", k=3)
    adapter.set_source_memory(feats, labels, 4)
    assert adapter(torch.rand(2, 3, 32, 32)).shape == (2, 4)


@pytest.mark.data
def test_build_memory_command_writes_the_memory_beside_the_card(tmp_path, monkeypatch):
    """`tta build-memory` end to end on a card with random weights (the pipeline, not accuracy)."""
    from pathlib import Path

    from tta.cli import main
    from tta.models import ModelCard, build_model, save_state_dict

    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is not installed")
    monkeypatch.setenv("TTA_MODELS_DIR", str(tmp_path))
    save_state_dict(build_model("resnet20", num_classes=10).state_dict(), tmp_path / "tiny.safetensors")
    ModelCard(name="tiny", arch="resnet20", num_classes=10, checkpoint="tiny.safetensors",
              dataset="fashion-mnist").save(tmp_path / "tiny.yaml")
    assert main(["build-memory", "--model", "tiny", "--limit", "96", "--dtype", "float16", "--batch-size", "48"]) == 0
    feats, labels, num_classes, meta = load_memory(tmp_path / "tiny.memory.safetensors")
    assert feats.shape == (96, 64) and feats.dtype == torch.float16 and num_classes == 10
    assert meta["card"] == "tiny" and meta["rows"] == "96"
    adapter = tta.adapt(tta.models.load("tiny"), "adanpc", memory="tiny", k=10)
    assert adapter.memory.num_source == 96
    assert adapter(torch.rand(4, 3, 32, 32)).shape == (4, 10)


# ---------------------------------------------------------------------- AdaNPC-BN (feature_bn)
def vote_by_hand(queries, rows, labels, num_classes, k, tau):
    """Dense cosine top-k softmax vote in plain torch (rows already normalised)."""
    top, idx = (F.normalize(queries, dim=1) @ rows.T).topk(k, dim=1)
    w = torch.softmax(top / tau, dim=1)
    return torch.zeros(queries.shape[0], num_classes).scatter_add(1, labels[idx], w)


def test_feature_bn_defaults_follow_the_reference():
    cfg = tta.adapter_config("adanpc", feature_bn=True)
    assert (cfg.bn_steps, cfg.bn_lr, cfg.temperature, cfg.beta, cfg.k) == (3, 1e-5, 0.01, 0.1, 100)
    assert tta.adapter_config("adanpc").temperature == 0.1
    assert tta.adapter_config("adanpc", feature_bn=True, temperature=0.2).temperature == 0.2
    with pytest.raises(ConfigError, match="bn_steps"):
        tta.adapter_config("adanpc", bn_steps=0)


def test_feature_bn_update_changes_only_the_feature_bn():
    model = small_cnn()
    adapter = make(model, feature_bn=True, k=5, bn_lr=1e-2)
    model_before = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    source_rows = adapter.memory.rows()[0].clone()
    bn = adapter.feature_bn
    assert [p for p in adapter.optimizer.param_groups[0]["params"]] == [bn.weight, bn.bias]
    assert torch.equal(bn.weight, torch.ones(8)) and torch.equal(bn.bias, torch.zeros(8))
    adapter(torch.rand(6, 3, 8, 8) * 2)
    for k, v in adapter.model.state_dict().items():
        assert torch.equal(v, model_before[k]), k
    assert torch.equal(adapter.memory.rows()[0][: adapter.memory.num_source], source_rows)
    assert not torch.equal(bn.weight, torch.ones(8)) and not torch.equal(bn.bias, torch.zeros(8))
    assert adapter.optimizer.state[bn.weight]["step"].item() == 3  # bn_steps Adam steps on the batch
    assert int(bn.num_batches_tracked) == 3


def test_feature_bn_step_is_entropy_minimisation_of_the_vote():
    """One step re-derived: fresh BN (batch statistics), vote at tau, entropy of the vote, one Adam step."""
    model = small_cnn()
    adapter = make(model, feature_bn=True, bn_steps=1, k=5, bn_lr=1e-2)
    rows, labels = (t.clone() for t in adapter.memory.rows())
    x = torch.rand(6, 3, 8, 8) * 2
    with torch.no_grad():
        f = model[:5](x)
    w = torch.ones(8, requires_grad=True)
    b = torch.zeros(8, requires_grad=True)
    z = (f - f.mean(0)) / torch.sqrt(f.var(0, unbiased=False) + 1e-5) * w + b
    p = vote_by_hand(z, rows, labels, 4, 5, 0.01)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(1).mean()
    entropy.backward()
    opt = torch.optim.Adam([w, b], lr=1e-2)
    opt.step()
    probs = adapter(x)
    torch.testing.assert_close(probs, p.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(adapter.feature_bn.weight.detach(), w.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(adapter.feature_bn.bias.detach(), b.detach(), rtol=1e-5, atol=1e-6)
    # memory extension (the reference rule): every feature whose vote confidence >= beta is appended,
    # as its normalised BN feature with the vote's argmax as label -- once per batch
    n = adapter.memory.num_source
    feats_mem, labels_mem = adapter.memory.rows()
    keep = p.max(1).values >= 0.1
    assert adapter.memory.num_test == int(keep.sum())
    torch.testing.assert_close(feats_mem[n:], F.normalize(z.detach(), dim=1)[keep], rtol=1e-4, atol=1e-5)
    assert torch.equal(labels_mem[n:], p.argmax(1)[keep])


def test_feature_bn_appends_once_per_batch_and_respects_beta():
    adapter = make(feature_bn=True, k=5)
    adapter(torch.rand(6, 3, 8, 8))
    assert adapter.memory.num_test == 6  # 3 steps, one append of the last step's features
    strict = make(feature_bn=True, k=5, beta=1.01)
    strict(torch.rand(6, 3, 8, 8))
    assert strict.memory.num_test == 0 and int(strict.feature_bn.num_batches_tracked) == 3


def test_feature_bn_trains_under_a_callers_no_grad_and_resets():
    adapter = make(feature_bn=True, k=5, bn_lr=1e-2)
    x = torch.rand(6, 3, 8, 8)
    first = adapter(x)
    with torch.no_grad():
        adapter(torch.rand(6, 3, 8, 8))
    assert adapter.optimizer.state[adapter.feature_bn.weight]["step"].item() == 6
    adapter.reset()
    assert adapter.memory.num_test == 0 and not adapter.optimizer.state
    assert torch.equal(adapter.feature_bn.weight, torch.ones(8)) and int(adapter.feature_bn.num_batches_tracked) == 0
    torch.testing.assert_close(adapter(x), first)


def test_feature_bn_state_round_trip(tmp_path):
    model = small_cnn()
    adapter = make(model, feature_bn=True, k=5, bn_lr=1e-2)
    adapter(torch.rand(6, 3, 8, 8))
    adapter.save(tmp_path / "s.pt")
    x = torch.rand(6, 3, 8, 8)
    want = adapter(x)
    other = make(small_cnn(), feature_bn=True, k=5, bn_lr=1e-2)
    other.load(tmp_path / "s.pt")
    torch.testing.assert_close(other(x), want)
    torch.testing.assert_close(other.feature_bn.weight, adapter.feature_bn.weight)


def test_feature_bn_single_image_uses_running_statistics_without_adapting():
    adapter = make(feature_bn=True, k=5)
    adapter(torch.rand(6, 3, 8, 8))
    weight = adapter.feature_bn.weight.clone()
    size = adapter.memory.size
    probs = adapter(torch.rand(1, 3, 8, 8))
    assert probs.shape == (1, 4) and adapter.counters["small_batches"] == 1
    assert adapter.memory.size == size and torch.equal(adapter.feature_bn.weight, weight)


def test_extend_memory_false_is_the_source_vote():
    adapter = make(extend_memory=False, k=5)
    rows, labels = (t.clone() for t in adapter.memory.rows())
    x = torch.rand(6, 3, 8, 8)
    probs = adapter(x)
    adapter(torch.rand(6, 3, 8, 8))
    assert adapter.memory.num_test == 0
    with torch.no_grad():
        want = vote_by_hand(adapter.model[:5](x), rows, labels, 4, 5, 0.1)
    torch.testing.assert_close(probs, want, rtol=1e-4, atol=1e-5)


def test_feature_bn_three_steps_rederived_with_the_reference_extension_rule():
    """bn_steps=3 by hand: each step votes with fresh batch statistics of the current BN, takes the
    entropy of the vote and one Adam step; the prediction is step 3's vote (before its update), and the
    memory receives step 3's normalised BN features whose vote confidence reaches beta, labelled with
    the vote's argmax (the reference's extend_test of confident test features with pseudo-labels)."""
    model = small_cnn()
    source_feats, source_labels = source_memory(model)

    def adapter_with(**cfg):
        adapter = tta.adapt(model, "adanpc", feature_bn=True, k=5, bn_lr=1e-2, **cfg)
        adapter.set_source_memory(source_feats, source_labels, 4)
        return adapter

    x = torch.rand(8, 3, 8, 8) * 2
    rows, labels = (t.clone() for t in adapter_with().memory.rows())
    with torch.no_grad():
        f = model[:5](x)
    w = torch.ones(8, requires_grad=True)
    b = torch.zeros(8, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    for _ in range(3):
        z = (f - f.mean(0)) / torch.sqrt(f.var(0, unbiased=False) + 1e-5) * w + b
        p = vote_by_hand(z, rows, labels, 4, 5, 0.01)
        opt.zero_grad()
        (-(p * torch.log(p.clamp_min(1e-12))).sum(1).mean()).backward()
        opt.step()
    conf = p.detach().max(1).values
    # a beta between the batch's confidences, so that the rule both keeps and rejects features
    beta = float(conf.sort().values[conf.numel() // 2 - 1] + conf.sort().values[conf.numel() // 2]) / 2
    keep = conf >= beta
    assert 0 < int(keep.sum()) < conf.numel()

    adapter = adapter_with(beta=beta)
    probs = adapter(x)
    torch.testing.assert_close(probs, p.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(adapter.feature_bn.weight.detach(), w.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(adapter.feature_bn.bias.detach(), b.detach(), rtol=1e-5, atol=1e-6)
    mem = adapter.memory
    feats_mem, labels_mem = mem.rows()
    assert mem.num_test == int(keep.sum())
    torch.testing.assert_close(feats_mem[mem.num_source:], F.normalize(z.detach(), dim=1)[keep], rtol=1e-4, atol=1e-5)
    assert torch.equal(labels_mem[mem.num_source:], p.detach().argmax(1)[keep])
    # the reference's confidence (softmax of the scores) is a different rule: with softmax_confidence the
    # kept set follows it
    quirk = adapter_with(beta=0.3, softmax_confidence=True)
    quirk(x)
    quirk_keep = p.detach().softmax(1).max(1).values >= 0.3
    assert 0 < int(quirk_keep.sum()) < conf.numel() and not torch.equal(quirk_keep, keep)
    assert quirk.memory.num_test == int(quirk_keep.sum())
    assert torch.equal(quirk.memory.rows()[1][quirk.memory.num_source:], p.detach().argmax(1)[quirk_keep])


def test_extend_memory_false_changes_nothing():
    """Without the extension the adapter is a fixed classifier: memory (rows, labels, stamps, counters),
    model and output stay exactly as they were, batch after batch, and it still saves and loads."""
    adapter = make(extend_memory=False, k=5)
    model_before = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    mem = adapter.memory
    before = (mem.features.clone(), mem.labels.clone(), mem.stamps.clone(), mem.size, mem.next_stamp)
    x = torch.rand(6, 3, 8, 8)
    first = adapter(x)
    for _ in range(5):
        adapter(torch.rand(7, 3, 8, 8) * 3)
    assert torch.equal(adapter(x), first)
    assert torch.equal(mem.features, before[0]) and torch.equal(mem.labels, before[1])
    assert torch.equal(mem.stamps, before[2]) and (mem.size, mem.next_stamp) == before[3:]
    for k, v in adapter.model.state_dict().items():
        assert torch.equal(v, model_before[k]), k
    assert adapter.collect_params() == []
    # the same input through a fresh adapter with the extension on differs once the memory has grown
    grown = make(k=5, beta=0.0)
    grown(x)
    for _ in range(5):
        grown(torch.rand(7, 3, 8, 8) * 3)
    assert grown.memory.num_test == 41 and not torch.equal(grown(x), first)


def test_extend_memory_false_with_feature_bn_trains_the_bn_only():
    adapter = make(extend_memory=False, feature_bn=True, k=5, bn_lr=1e-2)
    size = adapter.memory.size
    adapter(torch.rand(6, 3, 8, 8) * 2)
    assert adapter.memory.size == size and adapter.memory.next_stamp == 0
    assert not torch.equal(adapter.feature_bn.weight, torch.ones(8))
