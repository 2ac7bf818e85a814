"""SAR: reliable-entropy filtering, the SAM step and model recovery against hand derivations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import tta
from norm_oracle import affine_bn_model, bn_logits, entropy, leaf
from tta.adapters.entropy import module_matches, norm_affine_params
from tta.errors import ConfigError

C, N = 5, 16


def features(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, C, generator=g) * torch.linspace(0.5, 2.0, C)


def source_affine() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(C, generator=g) * 2 + 1.5, torch.randn(C, generator=g) * 0.3


def sar_oracle_step(feats, params, bufs, lr, rho=0.05, momentum=0.9):
    """One SAR step by hand. Returns (logits, new params, new momentum buffers, L2 or None, |S1|, |S2|)."""
    e0 = 0.4 * math.log(C)
    g, b = leaf(params[0]), leaf(params[1])
    z = bn_logits(feats, g, b)
    h = entropy(z)
    s1 = h.detach() < e0
    loss1 = h[s1].mean() if s1.any() else (h * 0).sum()
    grad = torch.autograd.grad(loss1, (g, b))
    norm = torch.sqrt(sum((t**2).sum() for t in grad))
    eps = [rho * t / (norm + 1e-12) for t in grad]
    g2, b2 = leaf(params[0] + eps[0]), leaf(params[1] + eps[1])
    h2 = entropy(bn_logits(feats, g2, b2))
    s2 = s1 & (h2.detach() < e0)
    loss2 = h2[s2].mean() if s2.any() else (h2 * 0).sum()
    grad2 = torch.autograd.grad(loss2, (g2, b2))
    new_bufs = [gr.clone() if buf is None else momentum * buf + gr for gr, buf in zip(grad2, bufs)]
    new_params = [p - lr * buf for p, buf in zip(params, new_bufs)]
    return z.detach(), new_params, new_bufs, (float(loss2.detach()) if s2.any() else None), int(s1.sum()), int(s2.sum())


def test_sar_step_matches_a_hand_derivation():
    gamma, beta = source_affine()
    lr = 0.3
    adapter = tta.adapt(affine_bn_model(gamma, beta), "sar", lr=lr, reset_constant=0.0)
    params, bufs, ema = [gamma, beta], [None, None], None
    counts = []
    for step, seed in enumerate((1, 2, 3, 4)):
        feats = features(seed)
        out = adapter(feats.view(N, C, 1, 1))
        z, params, bufs, loss2, n1, n2 = sar_oracle_step(feats, params, bufs, lr)
        counts.append((n1, n2))
        if loss2 is not None:
            ema = loss2 if ema is None else 0.9 * ema + 0.1 * loss2
        torch.testing.assert_close(out, z, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(adapter.model[1].weight.detach(), params[0], atol=2e-5, rtol=1e-5, msg=f"step {step}")
        torch.testing.assert_close(adapter.model[1].bias.detach(), params[1], atol=2e-5, rtol=1e-5, msg=f"step {step}")
        assert adapter.loss_average == pytest.approx(ema, rel=1e-5)
    assert all(0 < n1 < N for n1, _ in counts) and any(n2 < n1 for n1, n2 in counts), counts
    assert adapter.counters["reliable"] == sum(n1 for n1, _ in counts)


def test_empty_selection_still_takes_the_momentum_step():
    """The reference's mean over an empty selection gives a zero gradient, and SGD's momentum keeps
    moving the parameters: the same here."""
    gamma, beta = source_affine()
    lr = 0.3
    adapter = tta.adapt(affine_bn_model(gamma, beta), "sar", lr=lr, reset_constant=0.0)
    adapter(features(1).view(N, C, 1, 1))
    _, params, bufs, _, _, _ = sar_oracle_step(features(1), [gamma, beta], [None, None], lr)
    flat = torch.zeros(N, C)  # every sample the same: uniform predictions, nothing reliable
    adapter(flat.view(N, C, 1, 1))
    want = [p - lr * 0.9 * buf for p, buf in zip(params, bufs)]
    torch.testing.assert_close(adapter.model[1].weight.detach(), want[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(adapter.model[1].bias.detach(), want[1], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("clears", [False, True])
def test_recovery_restores_the_source_parameters(clears):
    gamma, beta = source_affine()
    adapter = tta.adapt(affine_bn_model(gamma, beta), "sar", lr=0.3, reset_constant=10.0,
                        recovery_clears_momentum=clears)
    adapter(features(1).view(N, C, 1, 1))  # L2 < 10: the moving average falls below the threshold at once
    assert adapter.counters["recoveries"] == 1 and adapter.loss_average is None
    assert torch.equal(adapter.model[1].weight.detach(), gamma) and torch.equal(adapter.model[1].bias.detach(), beta)
    assert (len(adapter.optimizer.state) == 0) == clears  # the reference keeps SGD's momentum
    adapter.reset()
    assert len(adapter.optimizer.state) == 0


def test_optimizer_is_sgd_whatever_the_setting():
    with pytest.raises(ConfigError, match="'sgd'"):
        tta.adapter_config("sar", optimizer="adam")
    adapter = tta.adapt(affine_bn_model(*source_affine()), "sar", preset="cifar10")
    assert isinstance(adapter.optimizer, torch.optim.SGD)
    assert tta.adapter_config("sar", preset="imagenet").lr == 2.5e-4
    assert tta.adapter_config("sar", preset="cifar10").lr == 1e-3  # the preset's optimizer is not adam here


def test_top_layers_are_excluded_by_whole_name_components():
    assert module_matches("model.layer4.0.bn1", ["layer4"])
    assert module_matches("model.norm", ["norm"]) and not module_matches("model.blocks.0.norm1", ["norm"])
    assert module_matches("blocks.9.norm1", ["blocks.9"]) and not module_matches("blocks.90.norm1", ["blocks.9"])

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer3 = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
            self.layer4 = nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
            self.norm = nn.LayerNorm(4)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.norm(self.layer4(self.layer3(x)).mean((2, 3))))

    for name in ("sar", "deyo"):
        adapter = tta.adapt(Net().eval(), name)
        assert adapter.norm_param_names == ["layer3.1.weight", "layer3.1.bias"]
        assert not adapter.model.layer4[1].weight.requires_grad
    everything = tta.adapt(Net().eval(), "sar", excluded=())
    assert len(everything.norm_param_names) == 6
    assert [n for n, _ in norm_affine_params(Net())] == ["layer3.1.weight", "layer3.1.bias", "layer4.1.weight",
                                                           "layer4.1.bias", "norm.weight", "norm.bias"]
