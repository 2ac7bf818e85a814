"""CoTTA: fast path == reference_mode, ghost-BN views == separate forwards, EMA/restore against the
literal loops, configuration, state round trip and reset."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tta
from tta.adapters.cotta import CottaConfig, confidence_threshold
from tta.adapters.teacher import (
    CARD,
    ema_update_,
    ema_update_reference,
    resolve_card_fields,
    stochastic_restore_,
    stochastic_restore_reference,
)
from tta.augment import stack_views
from tta.errors import ConfigError
from tta.layers import set_ghost_groups


def small_cnn(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes),
    )
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def batches(n: int = 6, b: int = 8, size: int = 12) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.rand(b, 3, size, size, generator=g) for _ in range(n)]


def run(model: nn.Module, xs: list[torch.Tensor], **cfg) -> tuple[list[torch.Tensor], tta.Adapter]:
    adapter = tta.adapt(copy.deepcopy(model), "cotta", seed=11, n_views=5, restore_prob=0.05, **cfg)
    return [adapter(x) for x in xs], adapter


def anchor_confidences(model: nn.Module, xs: list[torch.Tensor]) -> list[float]:
    adapter = tta.adapt(copy.deepcopy(model), "cotta", seed=0)
    with torch.no_grad():
        return [float(adapter.anchor(x).softmax(1).amax(1).mean()) for x in xs]


@pytest.mark.parametrize("memory_format", ["auto", "contiguous"])
@pytest.mark.parametrize("case", ["always", "mixed", "never", "always-grey"])
def test_fast_path_equals_reference_mode(case, memory_format):
    model, xs = small_cnn(), batches(b=6, size=8)
    if case.endswith("-grey"):  # R = G = B: the fast path augments one channel, the reference three
        case = case.removesuffix("-grey")
        xs = [x[:, :1].expand_as(x).contiguous() for x in xs]
    conf = sorted(anchor_confidences(model, xs))
    ap = {"always": 1.0, "never": 0.0, "mixed": (conf[2] + conf[3]) / 2}[case]
    # 5 views in chunks of 4 + 1; auto = channels_last views on CPU
    fast, fa = run(model, xs, ap=ap, views_per_forward=4, views_memory_format=memory_format)
    ref, ra = run(model, xs, ap=ap, reference_mode=True)
    for f, r in zip(fast, ref):
        torch.testing.assert_close(f, r, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(fa.model.named_parameters(), ra.model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5, msg=name)
    for p, q in zip(fa.teacher.parameters(), ra.teacher.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)
    used = fa.counters.get("aug_used", 0)
    assert used == ra.counters.get("aug_used", 0)
    assert used == {"always": 6, "never": 0, "mixed": 3}[case]
    assert fa.augmentation_skip_fraction == pytest.approx(1 - used / 6)
    # restore actually happened and the student moved away from the source
    assert any(not torch.equal(p, s) for p, s in zip(fa._restore_params, fa._restore_sources))


@pytest.mark.parametrize(("configured", "expected"), [("auto", True), ("channels_last", True), ("contiguous", False)])
def test_views_memory_format_reaches_the_teacher(configured, expected):
    adapter = tta.adapt(small_cnn(), "cotta", seed=0, n_views=3, ap=1.0, views_memory_format=configured)
    seen = []
    hook = adapter.teacher[0].register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)
                                     and not args[0].is_contiguous()))
    adapter(batches(1)[0])
    hook.remove()
    assert seen[0] is False  # the clean teacher forward keeps the input's format
    assert seen[1:] == [expected] * 3  # one forward per view on CPU (auto views_per_forward)


def test_views_memory_format_is_validated():
    with pytest.raises(ConfigError, match="views_memory_format"):
        CottaConfig(views_memory_format="nhwc")


def test_ghost_bn_batched_views_equal_separate_forwards():
    adapter = tta.adapt(small_cnn(), "cotta", seed=0, n_views=5)
    x = batches(1)[0]
    g = torch.Generator().manual_seed(3)
    params = adapter.augment.draw(5, (12, 12), g)
    views = adapter.augment.apply(x, params, adapter.augment.noise(5, x, g))
    with torch.no_grad():
        separate = torch.stack([adapter.teacher(v) for v in views])
        set_ghost_groups(adapter.teacher, 5)
        batched = adapter.teacher(stack_views(views)).view(5, x.shape[0], -1)
        set_ghost_groups(adapter.teacher, 1)
        stacked_plain = adapter.teacher(stack_views(views)).view(5, x.shape[0], -1)
    torch.testing.assert_close(batched, separate, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(stacked_plain, separate, atol=1e-3)  # without ghost BN it differs


def test_ghost_bn_keeps_the_input_dtype_under_autocast():
    """A bf16 activation stays bf16 through ghost BN (an fp32 scale must not promote it: every
    later layer would pay a cast) and matches the fp32 ghost BN to bf16 precision."""
    from tta.layers import CalibratedBatchNorm

    layer = CalibratedBatchNorm.from_batchnorm(nn.BatchNorm2d(6), 0.0)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    layer.ghost_groups = 4
    x = torch.randn(8, 6, 5, 5) * 3 + 1
    with torch.no_grad():
        want = layer(x)
        got = layer(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.02)


def test_foreach_ema_and_restore_match_the_literal_loops():
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 3, 3, 3), (4,), (10, 7)]
    student = [torch.randn(s, generator=g) for s in shapes]
    source = [torch.randn(s, generator=g) for s in shapes]
    teacher = [torch.randn(s, generator=g) for s in shapes]
    t_fast, t_ref = [t.clone() for t in teacher], [t.clone() for t in teacher]
    ema_update_(t_fast, student, 0.999)
    ema_update_reference(t_ref, student, 0.999)
    for a, b, t, s in zip(t_fast, t_ref, teacher, student):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)
        torch.testing.assert_close(a, 0.999 * t + 0.001 * s)
    p_fast, p_ref = [s.clone() for s in student], [s.clone() for s in student]
    stochastic_restore_(p_fast, source, 0.3, torch.Generator().manual_seed(9))
    stochastic_restore_reference(p_ref, source, 0.3, torch.Generator().manual_seed(9))
    restored = 0
    for a, b, s, src in zip(p_fast, p_ref, student, source):
        assert torch.equal(a, b)  # identical masks by construction, exact values
        assert torch.all((a == s) | (a == src))
        restored += int((a == src).sum())
    total = sum(s.numel() for s in student)
    assert 0.15 * total < restored < 0.45 * total


def test_config_presets_and_card_threshold():
    cfg = tta.adapter_config("cotta", preset="imagenet")
    assert (cfg.optimizer, cfg.lr, cfg.restore_prob, cfg.ap, cfg.loss) == ("sgd", 0.01, 0.001, 0.1, "symmetric_ce")
    assert tta.adapter_config("cotta", preset="cifar100").ap == 0.72
    assert tta.adapter_config("cotta").ap == 0.92 and tta.adapter_config("cotta").n_views == 32
    parsed = CottaConfig.parse_assignments(["ap=card", "n_views=8", "reference_mode=true"])
    assert parsed == {"ap": CARD, "n_views": 8, "reference_mode": True}

    class Card:
        cotta_threshold = 0.83

    assert resolve_card_fields(CottaConfig, parsed, Card())["ap"] == 0.83
    with pytest.raises(ConfigError, match="cannot be taken from a model card"):
        CottaConfig.parse_assignments(["lr=card"])
    with pytest.raises(ConfigError):
        tta.adapter_config("cotta", ap=CARD)
    with pytest.raises(ConfigError, match="restore_prob"):
        tta.adapter_config("cotta", restore_prob=2.0)


def test_trainable_parameters_are_every_weight_and_bias():
    adapter = tta.adapt(small_cnn(), "cotta", seed=0)
    names = {n for n, p in adapter.model.named_parameters() if p.requires_grad}
    assert names == {n for n, _ in adapter.model.named_parameters()}
    assert not any(p.requires_grad for p in adapter.teacher.parameters())
    assert not any(p.requires_grad for p in adapter.anchor.parameters())
    # the source state is the anchor (no extra copy) and fork() shares it
    assert adapter._source_state["0.weight"] is adapter.anchor.get_parameter("0.weight")
    assert adapter.fork().anchor.get_parameter("0.weight") is adapter.anchor.get_parameter("0.weight")


def test_confidence_threshold_rule():
    model = small_cnn()
    x = batches(1, b=40)[0]
    with torch.no_grad():
        conf = model(x).softmax(1).amax(1)
    assert confidence_threshold(model, x, batch_size=16) == pytest.approx(float(torch.quantile(conf, 0.05)) - 0.05)


def test_state_round_trip_and_reset(tmp_path):
    model, xs = small_cnn(), batches(4)
    a = tta.adapt(copy.deepcopy(model), "cotta", seed=2, n_views=4, ap=1.0, restore_prob=0.1)
    a(xs[0]), a(xs[1])
    a.save(tmp_path / "cotta.pt")
    b = tta.adapt(copy.deepcopy(model), "cotta", seed=99, n_views=4, ap=1.0, restore_prob=0.1)
    b.load(tmp_path / "cotta.pt")
    torch.testing.assert_close(a(xs[2]), b(xs[2]), atol=0, rtol=0)
    torch.testing.assert_close(a(xs[3]), b(xs[3]), atol=0, rtol=0)

    fresh = tta.adapt(copy.deepcopy(model), "cotta", seed=2, n_views=4, ap=1.0, restore_prob=0.1)
    a.reset()
    assert a.optimizer.state == {} or all(not s for s in a.optimizer.state.values())
    for p, q in zip(a.teacher.parameters(), fresh.teacher.parameters()):
        assert torch.equal(p, q)
    torch.testing.assert_close(a(xs[0]), fresh(xs[0]), atol=0, rtol=0)


def test_bad_batch_leaves_the_state_untouched():
    adapter = tta.adapt(small_cnn(), "cotta", seed=0, n_views=2)
    before = {k: v.clone() for k, v in adapter.state_dict().items() if isinstance(v, torch.Tensor)}
    x = batches(1)[0]
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(Exception, match="NaN"):
        adapter(x)
    for k, v in adapter.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), k
