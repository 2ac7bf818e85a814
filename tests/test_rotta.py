"""RoTTA against independent re-derivations: robust BN, the category-balanced memory bank (admission and
eviction by timeliness and uncertainty, the paper's class-list algorithm written out here), the
time-aware weights and one whole teacher-student update; state round trip, reset, both cards."""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tta
from tta.adapters.rotta import CategoryBalancedMemory, RobustBatchNorm, timeliness_weights
from tta.errors import InvalidInputError, StateMismatchError


def bn_net(num_classes: int = 4) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, num_classes))
    g = torch.Generator().manual_seed(4)
    model[1].running_mean.copy_(torch.randn(5, generator=g) * 0.2)
    model[1].running_var.copy_(torch.rand(5, generator=g) + 0.5)
    model[1].weight.data.copy_(torch.rand(5, generator=g) + 0.5)
    model[1].bias.data.copy_(torch.randn(5, generator=g) * 0.1)
    return model.eval()


# ---------------------------------------------------------------------- robust BN
def test_robust_bn_updates_global_statistics_and_normalises_with_them():
    bn = bn_net()[1]
    layer = RobustBatchNorm(bn, momentum=0.05)
    x = torch.randn(6, 5, 4, 4, dtype=torch.float64).float().requires_grad_(True)
    mu0, var0 = bn.running_mean.clone(), bn.running_var.clone()
    # eval: the stored statistics, nothing changes
    layer.eval()
    expected = (x - mu0.view(1, -1, 1, 1)) / torch.sqrt(var0.view(1, -1, 1, 1) + bn.eps)
    expected = expected * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(layer.running_mean, mu0)
    # train: mu <- 0.95 mu + 0.05 mean(x), var <- 0.95 var + 0.05 biased var(x); normalise with those
    layer.train()
    out = layer(x)
    batch_mean = x.detach().mean((0, 2, 3))
    batch_var = ((x.detach() - batch_mean.view(1, -1, 1, 1)) ** 2).mean((0, 2, 3))  # biased
    mu1, var1 = 0.95 * mu0 + 0.05 * batch_mean, 0.95 * var0 + 0.05 * batch_var
    torch.testing.assert_close(layer.running_mean, mu1, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(layer.running_var, var1, rtol=1e-6, atol=1e-7)

    def reference(inp: torch.Tensor) -> torch.Tensor:  # the batch's share carries the gradient
        m = 0.95 * mu0 + 0.05 * inp.mean((0, 2, 3))
        v = 0.95 * var0 + 0.05 * ((inp - inp.mean((0, 2, 3)).view(1, -1, 1, 1)) ** 2).mean((0, 2, 3))
        y = (inp - m.view(1, -1, 1, 1)) / torch.sqrt(v.view(1, -1, 1, 1) + bn.eps)
        return y * bn.weight.detach().view(1, -1, 1, 1) + bn.bias.detach().view(1, -1, 1, 1)

    torch.testing.assert_close(out, reference(x), rtol=1e-5, atol=1e-6)
    w = torch.randn_like(out)
    (g_layer,) = torch.autograd.grad((out * w).sum(), x)
    (g_ref,) = torch.autograd.grad((reference(x) * w).sum(), x)
    torch.testing.assert_close(g_layer, g_ref, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------- the memory bank
class ListMemory:
    """The paper's CSTU written as class lists, item by item (the independent re-derivation)."""

    def __init__(self, capacity: int, num_classes: int, lambda_t: float = 1.0, lambda_u: float = 1.0) -> None:
        self.capacity, self.num_classes = capacity, num_classes
        self.lambda_t, self.lambda_u = lambda_t, lambda_u
        self.classes: list[list[dict]] = [[] for _ in range(num_classes)]

    def score(self, age: int, u: float) -> float:
        return self.lambda_t * 1 / (1 + math.exp(-age / self.capacity)) + self.lambda_u * u / math.log(self.num_classes)

    def add(self, key: int, label: int, u: float) -> None:
        occupied = sum(len(c) for c in self.classes)
        new_score = self.score(0, u)
        if len(self.classes[label]) < self.capacity / self.num_classes:
            if occupied < self.capacity:
                admit = True
            else:
                most = max(len(c) for c in self.classes)
                admit = self.evict([k for k, c in enumerate(self.classes) if len(c) == most], new_score)
        else:
            admit = self.evict([label], new_score)
        if admit:
            self.classes[label].append({"key": key, "u": u, "age": 0})
        for c in self.classes:
            for item in c:
                item["age"] += 1

    def evict(self, classes: list[int], new_score: float) -> bool:
        best = None
        for k in classes:
            for i, item in enumerate(self.classes[k]):
                s = self.score(item["age"], item["u"])
                if best is None or s >= best[0]:
                    best = (s, k, i)
        if best is None:
            return True
        if best[0] > new_score:
            self.classes[best[1]].pop(best[2])
            return True
        return False

    def items(self) -> list[tuple[int, int, float, int]]:
        return [(it["key"], k, it["u"], it["age"]) for k, c in enumerate(self.classes) for it in c]


def bank_items(memory: CategoryBalancedMemory, keys: dict[int, int]) -> list[tuple[int, int, float, int]]:
    ages = memory.ages()
    return [(keys[int(s)], int(memory.label[s]), float(memory.entropy[s]), int(ages[s])) for s in memory.order()]


@pytest.mark.parametrize(("capacity", "num_classes", "skew", "ties"), [
    (8, 4, 0.0, False), (10, 3, 0.8, False), (64, 10, 0.6, False), (6, 4, 0.5, True), (5, 10, 0.3, False),
])
def test_memory_bank_admission_and_eviction_match_the_class_list_algorithm(capacity, num_classes, skew, ties):
    rng = random.Random(capacity * 31 + num_classes)
    memory = CategoryBalancedMemory(capacity, num_classes, lambda_t=1.0, lambda_u=1.0)
    reference = ListMemory(capacity, num_classes)
    keys: dict[int, int] = {}  # slot -> key of the sample stored there
    rejected = evicted = 0
    for key in range(400):
        label = 0 if rng.random() < skew else rng.randrange(num_classes)  # class imbalance
        u = rng.choice([0.3, 0.9]) if ties else rng.random() * math.log(num_classes)
        before = len(memory)
        slot = memory.add(label, u)
        if slot is None:
            rejected += 1
        else:
            evicted += before == len(memory)
            keys[slot] = key
        reference.add(key, label, u)
        assert bank_items(memory, keys) == reference.items(), f"after sample {key}"
    assert rejected > 0 and evicted > 0  # both branches of the rule were exercised
    counts = [sum(1 for it in reference.items() if it[1] == k) for k in range(num_classes)]
    assert sum(counts) <= capacity


def test_memory_scores_follow_timeliness_and_uncertainty():
    memory = CategoryBalancedMemory(64, 10, lambda_t=1.0, lambda_u=2.0)
    got = memory.score(np.array([0, 32, 64]), np.array([0.0, 1.0, math.log(10)]))
    want = [1 / (1 + math.exp(-a / 64)) + 2.0 * u / math.log(10) for a, u in ((0, 0.0), (32, 1.0), (64, math.log(10)))]
    assert got.tolist() == pytest.approx(want, rel=1e-12)


def test_timeliness_weights_are_the_sigmoid_of_minus_the_normalised_age():
    ages = torch.tensor([0, 1, 10, 64, 200]) / 64.0
    torch.testing.assert_close(timeliness_weights(ages), 1 / (1 + torch.exp(ages)), rtol=1e-6, atol=0)
    assert timeliness_weights(ages)[0] == 0.5 and bool((timeliness_weights(ages).diff() < 0).all())


# ---------------------------------------------------------------------- one whole update
def test_one_update_matches_a_plain_torch_rederivation():
    """update_frequency = batch size: one update per batch. The augmentation is made the identity so
    the update can be re-derived: the bank's images through the teacher (train mode: its robust BN
    moves), the student on them, loss = mean of w(age) * CE(teacher -> student), one SGD step, the EMA."""
    model = bn_net()
    b, lr, nu = 8, 0.5, 0.001
    x = torch.rand(b, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    adapter = tta.adapt(copy.deepcopy(model), "rotta", seed=0, memory_size=16, update_frequency=b,
                        optimizer="sgd", lr=lr, momentum=0.0, ema_momentum=1 - nu)
    adapter.augment.apply = lambda data, params, noise, grey_rgb=None: data.unsqueeze(0)
    out = adapter(x)

    # prediction: the source model (global statistics = source statistics in eval mode), before any update
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)
    # the bank after the batch, by the class-list rule on the teacher's pseudo-labels and entropies
    probs = model(x).softmax(1).detach()
    entropy = -(probs * torch.log(probs + 1e-6)).sum(1)
    reference = ListMemory(16, 4)
    for i in range(b):
        reference.add(i, int(probs[i].argmax()), float(entropy[i]))
    items = reference.items()
    rows = torch.tensor([it[0] for it in items])
    ages = torch.tensor([it[3] for it in items], dtype=torch.float32) / 16
    bank = x[rows]
    order = adapter.memory.order()
    assert torch.equal(adapter.memory.data[torch.from_numpy(order)], bank)
    assert adapter.memory.ages()[order].tolist() == [it[3] for it in items]

    # re-derivation: conv -> robust BN (train mode) -> relu -> pool -> linear, teacher and student alike
    conv, bn, fc = model[0], model[1], model[5]

    def forward(inp, gamma, beta, mu, var):
        h = F.conv2d(inp, conv.weight, conv.bias, padding=1)
        m = 0.95 * mu + 0.05 * h.mean((0, 2, 3))
        v = 0.95 * var + 0.05 * h.var((0, 2, 3), unbiased=False)
        h = (h - m.view(1, -1, 1, 1)) / torch.sqrt(v.view(1, -1, 1, 1) + bn.eps) * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)
        return F.linear(F.relu(h).mean((2, 3)), fc.weight, fc.bias), m.detach(), v.detach()

    gamma = bn.weight.detach().clone().requires_grad_(True)
    beta = bn.bias.detach().clone().requires_grad_(True)
    with torch.no_grad():
        t, t_mu, t_var = forward(bank, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    s, s_mu, s_var = forward(bank, gamma, beta, bn.running_mean, bn.running_var)
    w = torch.exp(-ages) / (1 + torch.exp(-ages))
    loss = (-(t.softmax(1) * s.log_softmax(1)).sum(1) * w).mean()
    g_gamma, g_beta = torch.autograd.grad(loss, (gamma, beta))
    new_gamma, new_beta = bn.weight - lr * g_gamma, bn.bias - lr * g_beta

    student_bn, teacher_bn = adapter.model[1], adapter.teacher[1]
    torch.testing.assert_close(student_bn.weight, new_gamma, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(student_bn.bias, new_beta, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(student_bn.running_mean, s_mu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(teacher_bn.running_var, t_var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(teacher_bn.weight, (1 - nu) * bn.weight + nu * new_gamma, rtol=1e-5, atol=1e-6)
    # the frozen conv/linear weights are the student's own tensors in the teacher (no copy)
    assert adapter.teacher[0].weight is adapter.model[0].weight
    assert adapter.counters["updates"] == 1


def test_updates_fire_every_update_frequency_samples_across_batches():
    adapter = tta.adapt(bn_net(), "rotta", seed=0, memory_size=8, update_frequency=5)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        adapter(torch.rand(3, 3, 6, 6, generator=g))
    assert adapter.instances == 12 and adapter.counters["updates"] == 2  # at samples 5 and 10
    adapter(torch.rand(1, 3, 6, 6, generator=g))  # a batch of one adapts too (no batch statistics needed)
    assert adapter.instances == 13


# ---------------------------------------------------------------------- state, reset, errors
def test_state_round_trip_bit_exact_and_reset(tmp_path):
    kw = dict(seed=2, memory_size=12, update_frequency=7)
    g = torch.Generator().manual_seed(5)
    xs = [torch.rand(5, 3, 6, 6, generator=g) for _ in range(5)]
    a = tta.adapt(bn_net(), "rotta", **kw)
    for x in xs[:3]:
        a(x)
    a.save(tmp_path / "rotta.pt")
    b = tta.adapt(bn_net(), "rotta", **{**kw, "seed": 9})
    b(xs[4])
    b.load(tmp_path / "rotta.pt")
    assert b.instances == a.instances and torch.equal(b.memory.data, a.memory.data)
    for x in xs[3:]:
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    for k, v in a.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, b.state_dict()[k]), k
    fresh = tta.adapt(bn_net(), "rotta", **kw)
    a.reset()
    assert len(a.memory) == 0 and a.instances == 0
    assert torch.equal(a.model[1].running_mean, fresh.model[1].running_mean)
    torch.testing.assert_close(a(xs[0]), fresh(xs[0]), rtol=0, atol=0)


def test_state_with_another_memory_size_or_bad_labels_is_refused(tmp_path):
    a = tta.adapt(bn_net(), "rotta", seed=0, memory_size=8, update_frequency=4)
    a(torch.rand(6, 3, 6, 6))
    state = a.state_dict()
    other = tta.adapt(bn_net(), "rotta", seed=0, memory_size=9, update_frequency=4)
    with pytest.raises(StateMismatchError, match="memory_size"):
        other.load_state_dict(state)
    bad = copy.deepcopy(state)
    mem = bad["_extra_state"]["rotta"]["memory"]
    mem["label"][mem["used"]] = 7
    with pytest.raises(StateMismatchError, match="label"):
        tta.adapt(bn_net(), "rotta", seed=0, memory_size=8, update_frequency=4).load_state_dict(bad)


def test_a_batch_of_another_image_size_is_refused_before_any_change():
    a = tta.adapt(bn_net(), "rotta", seed=0, memory_size=8, update_frequency=4)
    a(torch.rand(6, 3, 6, 6))
    before = copy.deepcopy(a.state_dict())
    with pytest.raises(InvalidInputError, match="memory bank holds images"):
        a(torch.rand(6, 3, 8, 8))
    assert a.instances == 6
    for k, v in before.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, a.state_dict()[k]), k


# ---------------------------------------------------------------------- the cards
@pytest.mark.parametrize("card", ["resnet20-fmnist", "vit-fmnist"])
def test_runs_on_both_cards(card):
    from tta.models import load

    source_bns = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in load(card).modules())
    adapter = tta.adapt(load(card), "rotta", seed=0, update_frequency=16, memory_size=16)
    robust = [m for m in adapter.model.modules() if isinstance(m, RobustBatchNorm)]
    norms = {n: p.detach().clone() for n, p in adapter.model.named_parameters() if p.requires_grad}
    source = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    x = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = adapter(x)
    assert out.shape == (32, 10) and torch.isfinite(out).all() and adapter.counters["updates"] == 2
    changed = {k for k, v in adapter.model.state_dict().items() if not torch.equal(v, source[k])}
    if card == "vit-fmnist":
        assert robust == []  # no BatchNorm: nothing for robust BN to replace
        assert changed and all(".norm" in k or k.startswith("norm") for k in changed)  # LayerNorm affine only
    else:
        assert len(robust) == source_bns > 0  # every BatchNorm became a robust BN
        assert any(k.endswith("running_mean") for k in changed)  # the global statistics moved
    assert set(norms) >= {k for k in changed if not k.endswith(("running_mean", "running_var"))}
