"""SAR: sharpness-aware and reliable entropy minimisation (Niu et al., ICLR 2023, "Towards Stable
Test-Time Adaptation in Dynamic Wild World").

Per batch x with logits z = f(x; theta) and C classes (e0 = ``margin_e0`` * ln C, 0.4 ln C):

 1. reliable samples S1: entropy H(z_i) < e0; L1 = mean over S1 of H;
 2. sharpness-aware minimisation (SAM, Foret et al. 2021, ``rho`` = 0.05): g = dL1/dtheta,
    theta' = theta + rho * g / ||g||;
 3. second forward at theta': S2 = the samples of S1 whose entropy there is still < e0;
    L2 = mean over S2 of H(f(x; theta'));
 4. theta <- SGD step from theta with the gradient dL2/dtheta' (lr, momentum 0.9);
 5. model recovery: e <- 0.9 e + 0.1 L2 (e = L2 at first; batches with an empty S2 leave e alone);
    when e < ``reset_constant`` (0.2) the model has collapsed to confident trivial predictions and
    its trained parameters go back to the source values (e is cleared).
 6. the prediction is f(x; theta) from step 1 (before the update).

Choices, as in the reference code (mr-eggplant/SAR and its port in mariodoebler/test-time-adaptation):

- The optimizer is SGD wrapped by SAM whatever an optimizer setting says (``optimizer`` accepts
  only "sgd"): lr 1e-3 (cifar10/cifar100 presets; the reference library takes the configured lr),
  imagenet preset 2.5e-4, momentum 0.9, no Nesterov. The reference library uses lr 1e-3 for every
  ViT/Swin model whatever the preset; pass ``lr=1e-3`` for those.
- An empty S1 or S2 still takes the SGD step, with a zero gradient: the momentum keeps moving the
  parameters, as the reference's mean over an empty selection (NaN loss, zero gradient) does.
- Recovery does not clear the SGD momentum: the reference restores the SAM wrapper's state, which
  does not hold the momentum buffers of the SGD inside it. ``recovery_clears_momentum=True``
  clears them too. `reset()` (the engine's reset policies, a user's reset) restores everything.
- Norm layers of the top of the network are not adapted, by module name (``excluded``): ``layer4``
  (ResNet-50), ``blocks.9``-``blocks.11`` (ViT-B) and the final ``norm``, the reference's list;
  on a model without those names (ResNet-20: layer1-3; a 4-block ViT) only the final norm is left out.
- Trained: norm affine parameters, BatchNorm with test-batch statistics, the model otherwise in
  eval mode (the reference library; the original code uses train mode: same without dropout).

Deviation: a batch whose logits are not finite (at theta or theta') is not adapted on and does not
enter e (counted in ``counters["skipped_nonfinite_loss"]``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from tta.adapters.config import OptimConfig
from tta.adapters.entropy import TOP_LAYERS, NormAffineAdapter, entropy_margin, softmax_entropy
from tta.adapters.registry import register_adapter
from tta.errors import ConfigError, StateMismatchError


@dataclass
class SarConfig(OptimConfig):
    """SAR options; defaults: the reference library's CIFAR-10-C configuration.

    rho: SAM neighbourhood radius (0.05).
    margin_e0: reliable-entropy threshold as a fraction of ln C (0.4).
    reset_constant: recovery threshold of the moving average of the second loss (0.2).
    loss_ema: momentum of that moving average (0.9).
    recovery_clears_momentum: also clear the SGD momentum on recovery (False: the reference).
    excluded: module names whose norm layers are not adapted (see the module docstring).
    """

    optimizer: Literal["sgd"] = "sgd"
    lr: float = 1e-3
    momentum: float = 0.9
    rho: float = 0.05
    margin_e0: float = 0.4
    reset_constant: float = 0.2
    loss_ema: float = 0.9
    recovery_clears_momentum: bool = False
    excluded: tuple[str, ...] = TOP_LAYERS

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "cifar10": {"lr": 1e-3, "momentum": 0.9},
        "cifar100": {"lr": 1e-3, "momentum": 0.9},
        "imagenet": {"lr": 2.5e-4, "momentum": 0.9},
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.optimizer != "sgd":
            raise ConfigError(f"sar: SAM wraps SGD (as in the reference); optimizer must be 'sgd', got {self.optimizer!r}")
        if not self.rho >= 0:
            raise ConfigError(f"rho must be >= 0, got {self.rho}")
        if not self.margin_e0 > 0:
            raise ConfigError(f"margin_e0 must be > 0, got {self.margin_e0}")
        if not 0.0 <= self.loss_ema <= 1.0:
            raise ConfigError(f"loss_ema must be in [0, 1], got {self.loss_ema}")


@register_adapter("sar")
class SAR(NormAffineAdapter[SarConfig]):
    """Reliable entropy minimisation with SAM and model recovery (see the module docstring)."""

    Config = SarConfig

    def __init__(self, model: nn.Module, config: SarConfig | None = None) -> None:
        #: moving average of the second-step loss (None until the first non-empty selection)
        self.loss_average: float | None = None
        super().__init__(model, config)
        #: preallocated copies of the parameters at theta (SAM's way back from theta')
        self._sam_backup = [torch.empty_like(p) for p in self.norm_params]

    def excluded_modules(self) -> tuple[str, ...]:
        return self.config.excluded

    @torch.enable_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        assert self.optimizer is not None
        params = self.norm_params
        outputs = self.model(x)
        if not self.outputs_are_finite(outputs):
            return outputs.detach()
        e0 = entropy_margin(cfg.margin_e0, outputs.shape[1])
        entropy = softmax_entropy(outputs)
        reliable = entropy.detach() < e0
        n1 = int(reliable.sum())
        self.counters["reliable"] = self.counters.get("reliable", 0) + n1
        loss1 = entropy[reliable].sum() / max(n1, 1)  # an empty selection: zero loss, zero gradient
        grads = torch.autograd.grad(loss1, params, materialize_grads=True)  # zeros for unused params
        backup = self._sam_backup
        with torch.no_grad():
            torch._foreach_copy_(backup, params)
            scale = cfg.rho / (torch.stack(torch._foreach_norm(grads)).norm() + 1e-12)
            torch._foreach_add_(params, torch._foreach_mul(grads, scale))  # climb to theta + e(theta)
        entropy2 = softmax_entropy(self.model(x))
        still = reliable & (entropy2.detach() < e0)
        n2 = int(still.sum())
        loss2 = entropy2[still].sum() / max(n2, 1)
        if not bool(torch.isfinite(loss2)):
            with torch.no_grad():
                torch._foreach_copy_(params, backup)
            self.counters["skipped_nonfinite_loss"] += 1
            return outputs.detach()
        self.optimizer.zero_grad(set_to_none=True)
        loss2.backward()
        with torch.no_grad():
            torch._foreach_copy_(params, backup)  # back to theta, then step with grad at theta'
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if n2 > 0:
            value = float(loss2.detach())
            a = cfg.loss_ema
            self.loss_average = value if self.loss_average is None else a * self.loss_average + (1 - a) * value
        if self.loss_average is not None and self.loss_average < cfg.reset_constant:
            self.recover()
        return outputs.detach()

    def _after_move(self) -> None:
        super()._after_move()
        self._sam_backup = [torch.empty_like(p) for p in self.norm_params]

    def recover(self) -> None:
        """Model recovery: trained parameters back to the source values, the loss average cleared;
        the SGD momentum is kept unless ``recovery_clears_momentum``."""
        self.model.load_state_dict(self._source_state, strict=False)
        self.loss_average = None
        if self.config.recovery_clears_momentum and self.optimizer is not None:
            self.optimizer.state.clear()
        self.counters["recoveries"] = self.counters.get("recoveries", 0) + 1

    def reset(self) -> None:
        super().reset()
        self.loss_average = None

    def get_extra_state(self) -> dict[str, Any]:
        state = super().get_extra_state()
        state["loss_average"] = self.loss_average
        return state

    def check_extra_state(self, extra: Mapping[str, Any], where: str) -> None:
        super().check_extra_state(extra, where)
        value = extra.get("loss_average")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 <= value < float("inf")):
            raise StateMismatchError(f"{where}: loss_average must be None or a finite number >= 0, got {value!r}")

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        value = state.get("loss_average")
        self.loss_average = None if value is None else float(value)


__all__ = ["SAR", "SarConfig"]
