"""The teacher-student base (`tta.adapters.teacher`): shared config validation, the teacher sharing the
student's frozen tensors, the card-artefact rule, the references' ImageNet optimizers (Nesterov), and
CoTTA's eval/train mode on a model with dropout."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tta
from tta.adapters.teacher import (
    AugmentedTeacherConfig,
    TeacherStudentAdapter,
    card_defaults,
    views_per_forward,
)
from tta.errors import ConfigError

TEACHER_STUDENT = ("cotta", "vida", "vdp", "rmt", "rotta")


def test_every_teacher_student_adapter_is_on_the_shared_base():
    for name in TEACHER_STUDENT:
        cls = tta.adapters.get_adapter_class(name)
        assert issubclass(cls, TeacherStudentAdapter), name
        assert tta.adapter_config(name).ema_momentum == 0.999, name


@pytest.mark.parametrize("name", ["cotta", "vida", "vdp"])
def test_shared_view_config_is_validated_for_each_adapter(name):
    cfg_cls = tta.adapters.get_adapter_class(name).Config
    assert issubclass(cfg_cls, AugmentedTeacherConfig)
    for bad in ({"ema_momentum": 1.5}, {"views_per_forward": -1}, {"views_memory_format": "nhwc"},
                {"loss": "kl"}, {"n_views": 0}):
        with pytest.raises(ConfigError):
            tta.adapter_config(name, **bad)
    if name != "cotta":  # ViDA and VDP need a mean / variance over views
        with pytest.raises(ConfigError, match="n_views must be >= 2"):
            tta.adapter_config(name, n_views=1)
    assert views_per_forward(0, 8, torch.device("cpu")) == 1 and views_per_forward(3, 2, torch.device("cpu")) == 2


@pytest.mark.parametrize("name", ["tent", "cotta", "vida", "rmt"])
def test_imagenet_presets_use_nesterov_sgd_as_the_references(name):
    cfg = tta.adapter_config(name, preset="imagenet")
    assert (cfg.optimizer, cfg.momentum, cfg.nesterov) == ("sgd", 0.9, True)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    adapter = tta.adapt(model.eval(), name, preset="imagenet", seed=0, **({"n_views": 2} if name == "vida" else {}))
    assert all(group["nesterov"] for group in adapter.optimizer.param_groups)


def test_the_teacher_shares_the_students_frozen_tensors():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    adapter = tta.adapt(model.eval(), "rotta", seed=0)
    assert adapter.teacher[0].weight is adapter.model[0].weight  # frozen: one tensor
    assert adapter.teacher[1].weight is not adapter.model[1].weight  # trained: the teacher's own EMA copy
    fork = adapter.fork()
    assert fork.model[0].weight is adapter.model[0].weight and fork.teacher[0].weight is adapter.model[0].weight


def test_card_artifacts_fill_unset_keys_from_the_cards_files(tmp_path):
    from tta.models import VIT_CARD

    vida = card_defaults(tta.adapters.get_adapter_class("vida").Config, {}, VIT_CARD)
    assert vida["adapter_weights"].endswith("vit-fmnist.vida.safetensors")
    given = card_defaults(tta.adapters.get_adapter_class("rmt").Config, {"prototypes": "mine.safetensors"}, VIT_CARD)
    assert given["prototypes"] == "mine.safetensors"  # an explicit value wins


# ---------------------------------------------------------------------- CoTTA: eval or train mode
def dropout_net() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Dropout(0.5), nn.Linear(6, 10)).eval()


def run_cotta(mode: str, global_seed: int, adapter_seed: int = 0) -> tuple[list[torch.Tensor], tta.Adapter]:
    torch.manual_seed(global_seed)
    adapter = tta.adapt(dropout_net(), "cotta", seed=adapter_seed, n_views=2, ap=1.0, model_mode=mode)
    xs = [torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    return [adapter(x) for x in xs], adapter


def test_cotta_eval_mode_runs_without_dropout():
    """Default (the reference library's choice): student, teacher and anchor in eval mode, so the
    dropout layer is the identity: nothing depends on torch's global generator, and the prediction
    of a step that does not augment is the teacher's deterministic forward."""
    outs, adapter = run_cotta("eval", global_seed=1)
    other, _ = run_cotta("eval", global_seed=12345)
    for a, b in zip(outs, other):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not adapter.model.training and not adapter.teacher.training and not adapter.anchor.training
    clean = tta.adapt(dropout_net(), "cotta", seed=0, ap=0.0)
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = copy.deepcopy(clean.teacher)(x)
    torch.testing.assert_close(clean(x), expected, rtol=0, atol=0)


def test_cotta_train_mode_follows_the_original_code_with_seeded_dropout(tmp_path):
    """model_mode="train" (the original CoTTA code): dropout is active in every forward, so results
    differ from eval mode, yet they follow the adapter's seed and not torch's global generator."""
    evals, _ = run_cotta("eval", global_seed=1)
    trains, adapter = run_cotta("train", global_seed=1)
    again, _ = run_cotta("train", global_seed=12345)
    other_seed, _ = run_cotta("train", global_seed=1, adapter_seed=7)
    assert adapter.model.training and adapter.teacher.training and adapter.anchor.training
    assert not torch.allclose(trains[0], evals[0])
    for a, b in zip(trains, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(trains[1], other_seed[1])
    # the saved state carries what the masks depend on
    adapter.save(tmp_path / "cotta.pt")
    restored = tta.adapt(dropout_net(), "cotta", seed=3, n_views=2, ap=1.0, model_mode="train")
    restored.load(tmp_path / "cotta.pt")
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(adapter(x), restored(x), rtol=0, atol=0)
