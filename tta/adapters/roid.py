"""ROID (Marsden, Döbler, Yang, WACV 2024, "Universal Test-time Adaptation through Weight
Ensembling, Diversity Weighting, and Prior Correction"); the authors' code is ``methods/roid.py``
of mariodoebler/test-time-adaptation.

Per batch x (B images, C classes), logits z = f(x; theta):

 1. weighting (``use_weighting``), without gradient, from p_i = softmax(z_i):
    diversity d_i = 1 - cos(m, p_i) against the moving average m of the batch-mean probabilities,
    certainty c_i = -H(p_i); both min-max normalised over the batch; samples with d_i below the
    batch mean of d are dropped (weight 0), the others weigh w_i = exp(d_i c_i / ``temperature``)
    (1/3). Then m <- 0.9 m + 0.1 mean_i p_i (``momentum_probs``; m starts uniform);
 2. soft likelihood ratio loss SLR_i = -sum_k q_ik log(q_ik / (1 - q_ik) + 1e-5), q = clamp(p, 0, 0.99);
    L = sum_i w_i SLR_i / B;
 3. consistency (``use_consistency``): one view of the kept images from the non-CoTTA augmentation
    set with reflect padding (`tta.augment.ReflectAugment`), L += sum_i w_i SCE(f(view_i), z_i) / B
    with the symmetric cross-entropy SCE(a, b) = -0.5 sum softmax(b) log softmax(a)
    - 0.5 sum softmax(a) log softmax(b) (gradients through both);
 4. one optimizer step, then weight ensembling towards the source: theta <- 0.99 theta + 0.01
    theta_source (``momentum_src``) over the trained parameters;
 5. prior correction (``use_prior_correction``) of the returned prediction, from the batch prior
    pi = mean_i p_i: s = max(1/B, 1/C) / max_k pi_k, pi' = (pi + s) / (1 + s C); the returned
    logits are z * pi' (the reference multiplies the logits, ``prior_on="logits"``); the prediction
    is z from step 1 (before the update), corrected.

Trained: the affine parameters of every BatchNorm/LayerNorm/GroupNorm, BatchNorm with test-batch
statistics (the consistency forward normalises its view batch with its own statistics), the model
otherwise in eval mode, as the reference.

Defaults: the reference library's CIFAR-10-C configuration (Adam lr 1e-3, everything on,
``momentum_src`` 0.99, ``momentum_probs`` 0.9, temperature 1/3); presets cifar10 / cifar100 the
same, imagenet SGD lr 2.5e-4, momentum 0.9, Nesterov (the library's default).

Choices and deviations:
- ``prior_on="probs"`` applies the correction to the probabilities instead (returned as
  log(p * pi'), which ranks classes as p * pi' does); multiplying logits by pi' is what the
  reference does, though a negative logit moves the other way.
- The loss sums are divided by the size of the batch at hand; the reference divides by the
  configured batch size, which differs only for a short last batch.
- Without weighting, the consistency term uses every sample with weight 1 (the reference's code
  path needs the weighting on).
- A batch with undefined weights (every sample equally diverse or certain, e.g. a batch of one:
  min-max normalisation divides by zero) gives a non-finite loss, which is not applied
  (``counters["skipped_nonfinite_loss"]``); the reference would step on it. A batch whose logits
  are not finite is not adapted on at all and leaves m unchanged.
- The consistency view draws its parameters from the adapter's CPU generator (saved in its state).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from tta.adapters.config import OptimConfig
from tta.adapters.entropy import NormAffineAdapter, softmax_entropy
from tta.adapters.registry import register_adapter
from tta.adapters.teacher import ema_update_
from tta.augment import ReflectAugment
from tta.errors import ConfigError


@dataclass
class RoidConfig(OptimConfig):
    """ROID options; defaults: the reference's (CIFAR-10-C configuration).

    use_weighting, use_prior_correction, use_consistency: the three parts (all on).
    momentum_src: weight-ensembling momentum towards the source weights (0.99).
    momentum_probs: momentum of the moving average of the batch-mean probabilities (0.9).
    temperature: of the sample weights exp(diversity * certainty / T) (1/3).
    prior_on: the prior correction multiplies the ``logits`` (reference) or the ``probs``.
    """

    use_weighting: bool = True
    use_prior_correction: bool = True
    use_consistency: bool = True
    momentum_src: float = 0.99
    momentum_probs: float = 0.9
    temperature: float = 1.0 / 3.0
    prior_on: Literal["logits", "probs"] = "logits"

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "cifar10": {"optimizer": "adam", "lr": 1e-3},
        "cifar100": {"optimizer": "adam", "lr": 1e-3},
        "imagenet": {"optimizer": "sgd", "lr": 2.5e-4, "momentum": 0.9, "nesterov": True},
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("momentum_src", "momentum_probs"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"{key} must be in [0, 1], got {getattr(self, key)}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.prior_on not in ("logits", "probs"):
            raise ConfigError(f"prior_on must be 'logits' or 'probs', got {self.prior_on!r}")


def soft_likelihood_ratio(logits: torch.Tensor, clip: float = 0.99, eps: float = 1e-5) -> torch.Tensor:
    """Per-sample soft likelihood ratio loss: -sum_k q_k log(q_k / (1 - q_k) + eps), q = clamp(p, 0, clip)."""
    q = logits.softmax(1).clamp(0.0, clip)
    return -(q * torch.log(q / (1.0 - q) + eps)).sum(1)


def symmetric_cross_entropy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample 0.5 CE(softmax(y) -> x) + 0.5 CE(softmax(x) -> y) of logits x, y."""
    return -0.5 * (y.softmax(1) * x.log_softmax(1)).sum(1) - 0.5 * (x.softmax(1) * y.log_softmax(1)).sum(1)


def minmax(v: torch.Tensor) -> torch.Tensor:
    return (v - v.min()) / (v.max() - v.min())


def prior_correction(logits: torch.Tensor, on: str = "logits") -> torch.Tensor:
    """ROID's prior correction of a batch of predictions (see the module docstring, step 5)."""
    b, c = logits.shape
    prior = logits.softmax(1).mean(0)
    smooth = max(1.0 / b, 1.0 / c) / prior.max()
    smoothed = (prior + smooth) / (1.0 + smooth * c)
    if on == "logits":
        return logits * smoothed
    return logits.log_softmax(1) + smoothed.log()


@register_adapter("roid")
class ROID(NormAffineAdapter[RoidConfig]):
    """ROID (Marsden et al., WACV 2024); see the module docstring.

    Weighted soft-likelihood-ratio self-training, consistency on a second view, weight ensembling
    towards the source and prior correction of the returned prediction (steps 1-5 of the module
    docstring)."""

    Config = RoidConfig
    probability_states = ("class_probs",)

    def __init__(self, model: nn.Module, config: RoidConfig | None = None) -> None:
        #: moving average of the batch-mean probabilities (uniform at the first batch)
        self.class_probs: torch.Tensor | None = None
        self.augment = ReflectAugment()
        super().__init__(model, config)

    @torch.enable_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        outputs = self.model(x)
        if not self.outputs_are_finite(outputs):
            return outputs.detach()
        b, c = outputs.shape
        keep = torch.ones(b, dtype=torch.bool, device=outputs.device)
        weights = torch.ones(b, dtype=outputs.dtype, device=outputs.device)
        if cfg.use_weighting:
            with torch.no_grad():
                probs = outputs.softmax(1)
                if self.class_probs is None or self.class_probs.shape[0] != c:
                    self.class_probs = torch.full((c,), 1.0 / c, device=probs.device, dtype=probs.dtype)
                class_probs = self.class_probs
                diversity = minmax(1 - F.cosine_similarity(class_probs.unsqueeze(0), probs, dim=1))
                keep = ~(diversity < diversity.mean())
                certainty = minmax(-softmax_entropy(outputs))
                weights = torch.where(keep, torch.exp(diversity * certainty / cfg.temperature), 0.0)
                m = cfg.momentum_probs
                self.class_probs = m * class_probs + (1 - m) * probs.mean(0)
        self.counters["selected"] = self.counters.get("selected", 0) + int(keep.sum())
        loss = (soft_likelihood_ratio(outputs) * weights)[keep].sum() / b
        if cfg.use_consistency:
            kept = x[keep]
            params = self.augment.draw(1, (x.shape[2], x.shape[3]), self.generator("cpu"))
            view_logits = self.model(self.augment.apply(kept, params, None)[0])
            loss = loss + (symmetric_cross_entropy(view_logits, outputs[keep]) * weights[keep]).sum() / b
        self.apply_loss(loss)
        ema_update_(self.norm_params, self.source_norm_params(), cfg.momentum_src)
        prediction = outputs.detach()
        if cfg.use_prior_correction:
            prediction = prior_correction(prediction, cfg.prior_on)
        return prediction


__all__ = ["ROID", "RoidConfig", "prior_correction", "soft_likelihood_ratio", "symmetric_cross_entropy"]
