"""Shared pieces of the entropy-minimisation family: TENT, EATA/ETA, SAR, DeYO, ROID.

All of them train only the affine parameters (``weight``, ``bias``) of normalisation layers, with
every BatchNorm normalising with the statistics of the test batch (the source statistics are kept
for reset and for the small-batch fallback) and the model otherwise in eval mode (no dropout or
stochastic depth), as the reference implementations do. `NormAffineAdapter` is that set-up;
`excluded_modules` lets SAR and DeYO leave out the top layers their references do not adapt.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from tta.adapters.base import Adapter
from tta.adapters.config import OptimConfig
from tta.errors import NoAdaptableLayerError, StateMismatchError
from tta.layers import CalibratedBatchNorm, replace_batchnorms

C = TypeVar("C", bound=OptimConfig)

NORM_TYPES = (CalibratedBatchNorm, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
#: module names of the top layers SAR's and DeYO's reference code does not adapt: layer4 of a
#: ResNet-50, blocks 9-11 of a ViT-B and the final norm (matched as whole name components)
TOP_LAYERS = ("layer4", "blocks.9", "blocks.10", "blocks.11", "norm")


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy of softmax(logits)."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def entropy_margin(factor: float, num_classes: int) -> float:
    """``factor * ln(C)``: EATA's/SAR's/DeYO's entropy thresholds are fractions of the maximum entropy."""
    return factor * math.log(num_classes)


def module_matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether the dotted module `name` contains one of `patterns` as a run of whole components.

    ``"layer4"`` matches ``model.layer4.0.bn1``; ``"blocks.9"`` matches ``blocks.9.norm1`` but not
    ``blocks.90``; ``"norm"`` matches the final ``model.norm`` but not ``blocks.0.norm1``.
    """
    parts = name.split(".")
    for pattern in patterns:
        want = pattern.split(".")
        k = len(want)
        if any(parts[i : i + k] == want for i in range(len(parts) - k + 1)):
            return True
    return False


def norm_affine_params(model: nn.Module, excluded: Iterable[str] = ()) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every weight/bias of a BatchNorm/LayerNorm/GroupNorm layer of `model`,
    in `named_modules` order, leaving out layers whose name matches `excluded` (`module_matches`)."""
    excluded = tuple(excluded)
    out = []
    for mod_name, module in model.named_modules():
        if not isinstance(module, NORM_TYPES) or (excluded and module_matches(mod_name, excluded)):
            continue
        for pname in ("weight", "bias"):
            p = module._parameters.get(pname)
            if p is not None:
                out.append((f"{mod_name}.{pname}" if mod_name else pname, p))
    return out


class NormAffineAdapter(Adapter[C]):
    """Eval mode, test-batch statistics in every BatchNorm, trains the norm layers' affine params.

    Subclasses set `excluded_modules()` to leave layers out (by name, see `module_matches`).
    ``self.norm_params`` lists the trained parameters and ``self.norm_param_names`` their names
    in the model's state dict.
    """

    uses_batch_stats = True
    #: attributes holding a running probability vector, None until first set (EATA's moving average
    #: of the selected probabilities, ROID's class prior): cleared by `reset`, moved with the model,
    #: saved in and restored from the state header (checked by `check_probability_state` first)
    probability_states: ClassVar[tuple[str, ...]] = ()

    def excluded_modules(self) -> tuple[str, ...]:
        return ()

    def configure_model(self) -> None:
        self.model.eval()
        self.model.requires_grad_(False)
        replace_batchnorms(self.model, 0.0)
        named = norm_affine_params(self.model, self.excluded_modules())
        if not named:
            raise NoAdaptableLayerError(
                f"{self.name}: the model ({type(self.model).__name__}) has no normalisation layer with affine "
                "parameters (BatchNorm/LayerNorm/GroupNorm) to train"
                + (f" outside the excluded modules {list(self.excluded_modules())}" if self.excluded_modules() else "")
            )
        if not any(isinstance(m, CalibratedBatchNorm) for m in self.model.modules()):
            self.uses_batch_stats = False  # type: ignore[misc]  # LN/GN-only model: a batch of one adapts
        self.norm_param_names = [n for n, _ in named]
        self.norm_params = [p for _, p in named]
        for p in self.norm_params:
            p.requires_grad_(True)

    def collect_params(self) -> list[nn.Parameter]:
        return self.norm_params

    def source_norm_params(self) -> list[torch.Tensor]:
        """The source values of `norm_params` (tensors of the source snapshot, which `.to()` keeps on
        the parameters' device and dtype); looked up once, again after a move."""
        cached = self.__dict__.get("_source_norm_params")
        if cached is None:
            cached = [self._source_state[name] for name in self.norm_param_names]
            self.__dict__["_source_norm_params"] = cached
        return cached

    def _as_param_tensor(self, value: torch.Tensor | None) -> torch.Tensor | None:
        p = self.norm_params[0]
        return None if value is None else value.to(device=p.device, dtype=p.dtype)

    def _after_move(self) -> None:
        super()._after_move()
        self.__dict__.pop("_source_norm_params", None)
        for key in self.probability_states:
            setattr(self, key, self._as_param_tensor(getattr(self, key)))

    def reset(self) -> None:
        super().reset()
        for key in self.probability_states:
            setattr(self, key, None)

    def get_extra_state(self) -> dict[str, Any]:
        state = super().get_extra_state()
        for key in self.probability_states:
            value = getattr(self, key)
            state[key] = None if value is None else value.clone()
        return state

    def check_extra_state(self, extra: Mapping[str, Any], where: str) -> None:
        super().check_extra_state(extra, where)
        for key in self.probability_states:
            check_probability_state(where, key, extra.get(key))

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        for key in self.probability_states:
            setattr(self, key, self._as_param_tensor(state.get(key)))

    def outputs_are_finite(self, outputs: torch.Tensor) -> bool:
        """False (and counted as a skipped step) when the logits hold NaN/Inf: no update then."""
        if bool(torch.isfinite(outputs).all()):
            return True
        self.counters["skipped_nonfinite_loss"] += 1
        return False


def check_probability_state(where: str, key: str, value: Any) -> None:
    """A saved probability vector (EATA's moving average, ROID's class prior): None or a finite,
    non-negative 1-D float tensor; raise `StateMismatchError`, never apply."""
    if value is None:
        return
    if not isinstance(value, torch.Tensor) or value.dim() != 1 or not value.is_floating_point() or value.numel() == 0:
        raise StateMismatchError(f"{where}: {key} must be None or a 1-D float tensor, got {value!r:.80}")
    if not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
        raise StateMismatchError(f"{where}: {key} holds negative or non-finite values")


__all__ = [
    "NORM_TYPES",
    "NormAffineAdapter",
    "TOP_LAYERS",
    "check_probability_state",
    "entropy_margin",
    "module_matches",
    "norm_affine_params",
    "softmax_entropy",
]
