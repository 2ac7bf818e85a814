"""EATA and ETA (Niu et al., ICML 2022, "Efficient Test-Time Model Adaptation without Forgetting").

ETA, per batch x with logits z = f(x) and C classes (e0 = ``margin_e0`` * ln C, 0.4 ln C):

 1. reliable samples: entropy H(z_i) < e0;
 2. non-redundant samples: among the reliable ones, |cos(m, softmax(z_i))| < ``d_margin``, where m is
    the moving average of the selected samples' mean probability vector. There is no m before the
    first selection: that batch skips this filter and m starts as the mean over its reliable samples;
    afterwards m <- 0.9 m + 0.1 mean (``probs_momentum``), unchanged by a batch selecting nothing;
 3. loss = mean over the selected samples of exp(e0 - H(z_i)) * H(z_i) (the weights detached);
 4. one optimizer step, only when at least one sample is selected.

EATA adds the anti-forgetting regulariser ``fisher_alpha`` * sum_k F_k (theta_k - theta_k^source)^2
over the trained parameters, where F is the diagonal Fisher information of the source model on
clean source images (`compute_fisher`): the reference draws 2,000 training images, runs them in
batches of the test batch size through the adapter's model set-up (BatchNorm with batch statistics)
and averages the squared gradient of the cross-entropy to the model's own argmax labels over the
batches. Here it is an artefact of the model card: ``tta build-fisher --model CARD`` writes
``<card>.fisher.safetensors`` (`fisher_path_for_card`) and ``fisher=CARD`` (the CLI's default for
this adapter) or ``fisher=PATH`` loads it (`ModelCard.artifact_path`: the user's rebuilt file first,
then the one shipped beside the card). ETA is EATA with ``fisher_alpha = 0``.

Trained: the affine parameters of every BatchNorm/LayerNorm/GroupNorm, BatchNorm with test-batch
statistics, the model otherwise in eval mode (the reference library's set-up; the original EATA
code puts the whole model in train mode, which differs only for dropout / stochastic depth).

Defaults: the CIFAR-10-C configuration of the reference library (mariodoebler/test-time-adaptation,
``cfgs/cifar10_c/eata.yaml``): Adam lr 1e-3, d_margin 0.4, fisher_alpha 1, e0 = 0.4 ln C; presets
cifar100: d_margin 0.1; imagenet: SGD lr 2.5e-4, momentum 0.9, Nesterov (the library's default;
the original EATA code uses plain momentum), fisher_alpha 2000, d_margin 0.05.

Deviations: a batch whose logits are not finite is not adapted on (counted in
``counters["skipped_nonfinite_loss"]``) and leaves m unchanged; the reference would update on it.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tta.adapters.config import OptimConfig
from tta.adapters.entropy import NormAffineAdapter, entropy_margin, softmax_entropy
from tta.adapters.registry import register_adapter
from tta.errors import ConfigError, InvalidInputError
from tta.models.artifacts import read_artifact, write_artifact

FISHER_FORMAT = "tta-eata-fisher/1"
FISHER_SUFFIX = ".fisher.safetensors"


@dataclass
class EtaConfig(OptimConfig):
    """ETA options; defaults: the reference library's CIFAR-10-C configuration.

    margin_e0: entropy threshold of reliable samples as a fraction of ln C (0.4).
    d_margin: cosine-similarity threshold of the redundancy filter (0.4; cifar100 0.1, imagenet 0.05).
    probs_momentum: momentum of the moving average of the selected samples' probabilities (0.9).
    """

    margin_e0: float = 0.4
    d_margin: float = 0.4
    probs_momentum: float = 0.9

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "cifar10": {"optimizer": "adam", "lr": 1e-3, "d_margin": 0.4},
        "cifar100": {"optimizer": "adam", "lr": 1e-3, "d_margin": 0.1},
        "imagenet": {"optimizer": "sgd", "lr": 2.5e-4, "momentum": 0.9, "nesterov": True, "d_margin": 0.05},
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.margin_e0 > 0:
            raise ConfigError(f"margin_e0 must be > 0, got {self.margin_e0}")
        if not self.d_margin > 0:
            raise ConfigError(f"d_margin must be > 0, got {self.d_margin}")
        if not 0.0 <= self.probs_momentum <= 1.0:
            raise ConfigError(f"probs_momentum must be in [0, 1], got {self.probs_momentum}")


@dataclass
class EataConfig(EtaConfig):
    """EATA = ETA + the Fisher regulariser.

    fisher_alpha: weight of the regulariser (1.0; imagenet 2000; 0 = ETA).
    fisher: a Fisher file (``tta build-fisher``) or a model card name whose
        ``<card>.fisher.safetensors`` is used; None: call `set_fisher` before the first batch.
    """

    fisher_alpha: float = 1.0
    fisher: str | None = None

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "cifar10": {**EtaConfig.PRESETS["cifar10"], "fisher_alpha": 1.0},
        "cifar100": {**EtaConfig.PRESETS["cifar100"], "fisher_alpha": 1.0},
        "imagenet": {**EtaConfig.PRESETS["imagenet"], "fisher_alpha": 2000.0},
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.fisher_alpha >= 0:
            raise ConfigError(f"fisher_alpha must be >= 0, got {self.fisher_alpha}")


@register_adapter("eta")
class ETA(NormAffineAdapter[EtaConfig]):
    """Entropy minimisation on reliable, non-redundant samples, re-weighted by their entropy."""

    Config = EtaConfig
    probability_states = ("model_probs",)

    def __init__(self, model: nn.Module, config: EtaConfig | None = None) -> None:
        #: moving average of the selected samples' probabilities (None until the first selection)
        self.model_probs: torch.Tensor | None = None
        super().__init__(model, config)

    def regulariser(self) -> torch.Tensor | None:
        """Extra loss term added on every update (EATA's Fisher term); None for ETA."""
        return None

    @torch.enable_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        outputs = self.model(x)
        if not self.outputs_are_finite(outputs):
            return outputs.detach()
        entropy = softmax_entropy(outputs)
        e0 = entropy_margin(cfg.margin_e0, outputs.shape[1])
        probs = outputs.detach().softmax(1)
        selected = entropy.detach() < e0
        self.counters["reliable"] = self.counters.get("reliable", 0) + int(selected.sum())
        if self.model_probs is not None:
            cosine = F.cosine_similarity(self.model_probs.unsqueeze(0), probs, dim=1)
            selected &= cosine.abs() < cfg.d_margin
        n = int(selected.sum())
        self.counters["selected"] = self.counters.get("selected", 0) + n
        if n == 0:
            return outputs.detach()
        chosen = entropy[selected]
        loss = (torch.exp(e0 - chosen.detach()) * chosen).mean()
        extra = self.regulariser()
        if extra is not None:
            loss = loss + extra
        if self.apply_loss(loss):
            batch_mean = probs[selected].mean(0)
            m = cfg.probs_momentum
            self.model_probs = batch_mean if self.model_probs is None else m * self.model_probs + (1 - m) * batch_mean
        return outputs.detach()


@register_adapter("eata")
class EATA(ETA):
    """ETA plus the Fisher anti-forgetting regulariser (see the module docstring)."""

    Config = EataConfig
    config: EataConfig

    def __init__(self, model: nn.Module, config: EataConfig | None = None) -> None:
        self._fisher_sqrt: list[torch.Tensor] | None = None
        super().__init__(model, config)
        if self.config.fisher is not None and self.config.fisher_alpha > 0:
            fisher, _ = load_fisher(resolve_fisher_path(self.config.fisher))
            self.set_fisher(fisher)

    def set_fisher(self, fisher: Mapping[str, torch.Tensor]) -> None:
        """Install the diagonal Fisher information, one tensor per trained parameter (by name)."""
        names = self.norm_param_names
        missing = sorted(set(names) - set(fisher))
        extra = sorted(set(fisher) - set(names))
        if missing or extra:
            raise InvalidInputError(
                f"eata: the Fisher information does not match the trained parameters of this model "
                f"(missing: {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected: "
                f"{extra[:3]}{'...' if len(extra) > 3 else ''}); build it for this model with `tta build-fisher`"
            )
        values = []
        for name, p in zip(names, self.norm_params):
            f = fisher[name]
            if tuple(f.shape) != tuple(p.shape):
                raise InvalidInputError(f"eata: Fisher entry {name} has shape {tuple(f.shape)}, the parameter {tuple(p.shape)}")
            values.append(f.detach().to(device=p.device, dtype=p.dtype))
        validate_fisher(dict(zip(names, values)))
        self._fisher_sqrt = torch._foreach_sqrt(values)

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.fisher_alpha > 0 and self._fisher_sqrt is None:
            raise ConfigError(
                "eata has no Fisher information: pass fisher=PATH_OR_CARD (build it with `tta build-fisher "
                "--model CARD`), call adapter.set_fisher(...), or use eta (fisher_alpha 0)"
            )
        return super().forward_and_adapt(x)

    def _after_move(self) -> None:
        super()._after_move()
        if self._fisher_sqrt is not None:
            p = self.norm_params[0]
            self._fisher_sqrt = [f.to(device=p.device, dtype=p.dtype) for f in self._fisher_sqrt]

    def regulariser(self) -> torch.Tensor | None:
        alpha = self.config.fisher_alpha
        if alpha == 0 or self._fisher_sqrt is None:
            return None
        params = self.norm_params
        # sum_k F_k (theta_k - theta_k^src)^2 = sum over tensors of ||sqrt(F) * (theta - theta^src)||^2
        scaled = torch._foreach_mul(torch._foreach_sub(params, self.source_norm_params()), self._fisher_sqrt)
        return alpha * torch.stack(torch._foreach_norm(scaled)).square().sum()


# ---------------------------------------------------------------------- the Fisher artefact
def fisher_path_for_card(card: str) -> Path:
    """The Fisher file ``<card>.fisher.safetensors`` of a model card (`ModelCard.artifact_path`: where
    `tta build-fisher` writes it, else beside the card); missing: where it would be written."""
    from tta.models import get_card

    mc = get_card(card)
    return mc.artifact_path(FISHER_SUFFIX) or mc.artifact_output_path(FISHER_SUFFIX)


def resolve_fisher_path(fisher: str | os.PathLike[str]) -> Path:
    """`fisher` itself when it names a ``.safetensors`` file, else the Fisher file of the model card
    `fisher` names (a card name or a card's YAML path)."""
    path = Path(fisher)
    if path.name.endswith(".safetensors"):
        return path
    return fisher_path_for_card(str(fisher))


def validate_fisher(fisher: Mapping[str, torch.Tensor]) -> None:
    if not fisher:
        raise InvalidInputError("EATA Fisher information is empty")
    for name, f in fisher.items():
        if not f.is_floating_point():
            raise InvalidInputError(f"EATA Fisher entry {name} must be floating point, got {f.dtype}")
        if not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
            raise InvalidInputError(f"EATA Fisher entry {name} holds negative or non-finite values")


@torch.enable_grad()
def compute_fisher(model: nn.Module, images: torch.Tensor, batch_size: int = 200,
                   device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """EATA's diagonal Fisher information of `model`'s norm affine parameters on clean `images`.

    `images`: uint8 or [0, 1] float NCHW, in the order to batch them (draw the random subset before).
    The model is set up as the adapter sets it up (a copy: batch statistics, eval mode); per batch
    the gradient of the mean cross-entropy to the model's argmax labels is squared, and the squares
    are averaged over the batches (the reference's recipe). Returns {parameter name: Fisher}.
    """
    if images.dim() != 4 or images.shape[0] == 0:
        raise InvalidInputError(f"compute_fisher: expected a non-empty (N, C, H, W) batch, got {tuple(images.shape)}")
    if batch_size < 1:
        raise ConfigError(f"compute_fisher: batch_size must be >= 1, got {batch_size}")
    setup = ETA(copy.deepcopy(model).to(device))
    params = setup.norm_params
    fisher = [torch.zeros_like(p, requires_grad=False) for p in params]
    batches = 0
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        outputs = setup.model(x)
        loss = F.cross_entropy(outputs, outputs.argmax(1))
        grads = torch.autograd.grad(loss, params)
        torch._foreach_addcmul_(fisher, grads, grads)
        batches += 1
    torch._foreach_div_(fisher, float(batches))
    return {name: f.detach().cpu() for name, f in zip(setup.norm_param_names, fisher)}


def save_fisher(path: str | os.PathLike[str], fisher: Mapping[str, torch.Tensor],
                metadata: Mapping[str, str] | None = None) -> Path:
    """Write a Fisher file (safetensors, one tensor per parameter name) atomically."""
    validate_fisher(fisher)
    return write_artifact(path, fisher, FISHER_FORMAT, metadata)


def load_fisher(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(Fisher tensors by parameter name, metadata) of a Fisher file, validated."""
    fisher, meta = read_artifact(path, FISHER_FORMAT, "EATA Fisher", "tta build-fisher --model CARD")
    validate_fisher(fisher)
    return fisher, meta


__all__ = [
    "EATA",
    "ETA",
    "EataConfig",
    "EtaConfig",
    "compute_fisher",
    "fisher_path_for_card",
    "load_fisher",
    "resolve_fisher_path",
    "save_fisher",
]
