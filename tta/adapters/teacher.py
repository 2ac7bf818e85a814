"""Shared teacher-student machinery (CoTTA, ViDA, VDP).

- `ema_update_`: teacher <- m * teacher + (1 - m) * student over whole parameter lists with two
  `torch._foreach_*` calls; `ema_update_reference` is the literal per-parameter loop of the
  reference code (the oracle of the tests and the `reference_mode` path).
- `stochastic_restore_`: every element of every listed parameter is reset to its source value with
  probability p. One uniform draw covers all parameters (on the parameters' device, from the
  adapter's generator), split into per-parameter weights, and one `torch._foreach_lerp_` applies it
  (lerp with a 0/1 weight returns exactly the start or the end value). On a CPU generator the draw
  consumes the stream exactly like the reference's per-parameter `torch.rand(p.shape)` calls, so
  both paths give bit-identical masks. `stochastic_restore_reference` is the literal loop.
- `TeacherStudentAdapter`: builds the teacher and a frozen source copy ("anchor") ONCE, when the
  adapter is built; the anchor's tensors double as the source state used by `reset()` and by the
  restore (no extra state copy, no per-step deep copy), and `fork()` shares them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from tta.adapters.config import CARD, OptimConfig
from tta.adapters.base import Adapter
from tta.errors import ConfigError

OC = TypeVar("OC", bound=OptimConfig)


# ---------------------------------------------------------------------- EMA
@torch.no_grad()
def ema_update_(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, for all tensors at once."""
    if not teacher:
        return
    torch._foreach_mul_(list(teacher), momentum)
    torch._foreach_add_(list(teacher), list(student), alpha=1.0 - momentum)


@torch.no_grad()
def ema_update_reference(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], momentum: float) -> None:
    """The reference code's loop: one parameter at a time."""
    for t, s in zip(teacher, student):
        t.data[:] = momentum * t.data[:] + (1 - momentum) * s.data[:]


# ---------------------------------------------------------------------- stochastic restore
@torch.no_grad()
def stochastic_restore_(
    params: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], prob: float, generator: torch.Generator
) -> None:
    """Reset each element of `params` to `sources` with probability `prob` (fresh masks per call).

    The uniform numbers are drawn on `generator`'s device (the parameters' device for the fast
    path), in parameter order.
    """
    if prob <= 0.0 or not params:
        return
    numels = [p.numel() for p in params]
    u = torch.rand(sum(numels), generator=generator, device=generator.device)
    weight = (u < prob).to(device=params[0].device, dtype=params[0].dtype)
    weights = [w.view(p.shape) for w, p in zip(torch.split(weight, numels), params)]
    torch._foreach_lerp_(list(params), list(sources), weights)


@torch.no_grad()
def stochastic_restore_reference(
    params: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], prob: float, generator: torch.Generator
) -> None:
    """The reference loop: a CPU-drawn Bernoulli mask per parameter, moved to the device."""
    if prob <= 0.0:
        return
    for p, src in zip(params, sources):
        mask = (torch.rand(p.shape, generator=generator) < prob).float().to(p.device)
        p.data = src * mask + p * (1.0 - mask)


# ---------------------------------------------------------------------- losses
def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """-(softmax(teacher) * log_softmax(student)).sum(1).mean() (CoTTA/ViDA, CIFAR)."""
    return -(teacher_logits.softmax(1) * student_logits.log_softmax(1)).sum(1).mean()


def symmetric_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """0.5 * CE(teacher -> student) + 0.5 * CE(student -> teacher) (CoTTA/ViDA, ImageNet)."""
    a = -(teacher_logits.softmax(1) * student_logits.log_softmax(1)).sum(1)
    b = -(student_logits.softmax(1) * teacher_logits.log_softmax(1)).sum(1)
    return (0.5 * a + 0.5 * b).mean()


LOSSES = {"soft_ce": soft_cross_entropy, "symmetric_ce": symmetric_cross_entropy}


def augmentation_uncertainty(view_logits: torch.Tensor) -> torch.Tensor:
    """ViDA's uncertainty: 0.1 * mean over batch and classes of the (unbiased) variance across views.

    `view_logits` is (V, B, K).
    """
    return 0.1 * view_logits.var(dim=0).mean()


# ---------------------------------------------------------------------- module helpers
def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy with every parameter detached from autograd (built once, never per step)."""
    clone = copy.deepcopy(model)
    clone.requires_grad_(False)
    return clone


def weight_bias_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """`weight`/`bias` parameters that require grad, in `named_modules` order (the reference's)."""
    out = []
    for mod_name, module in model.named_modules():
        for pname in ("weight", "bias"):
            p = module._parameters.get(pname)
            if isinstance(p, nn.Parameter) and p.requires_grad:
                out.append((f"{mod_name}.{pname}" if mod_name else pname, p))
    return out


def resolve_card_fields(config_cls: type, overrides: dict[str, Any], card: Any) -> dict[str, Any]:
    """Replace `CARD` markers in `overrides` with the card's values (``CARD_FIELDS``: key -> attribute)."""
    fields: Mapping[str, str] = getattr(config_cls, "CARD_FIELDS", {})
    out = dict(overrides)
    for key, value in overrides.items():
        if value == CARD and key in fields:
            resolved = getattr(card() if callable(card) else card, fields[key], None)
            if resolved is None:
                raise ConfigError(f"{key}=card: the model card has no {fields[key]!r} value")
            out[key] = resolved
    return out


def card_defaults(config_cls: type, overrides: dict[str, Any], card_name: str) -> dict[str, Any]:
    """CLI rule for teacher-student adapters: resolve ``key=card`` markers from the model card, and
    give ViDA (a config with ``adapter_weights``) the card's warmed-up adapters
    (``<card>.vida.safetensors``, `ModelCard.artifact_path`) when that file exists and none was set."""
    from tta.models import get_card

    overrides = resolve_card_fields(config_cls, overrides, lambda: get_card(card_name))
    if "adapter_weights" in getattr(config_cls, "__dataclass_fields__", {}) and overrides.get("adapter_weights") is None:
        weights = get_card(card_name).artifact_path(".vida.safetensors")
        if weights is not None:
            overrides = {**overrides, "adapter_weights": str(weights)}
    return overrides


# ---------------------------------------------------------------------- base class
class TeacherStudentAdapter(Adapter[OC]):
    """Student (`self.model`, trained) + EMA teacher + frozen source copy (`self.anchor`).

    Subclasses call `self._build_copies()` at the end of `configure_model()` (after swapping layers
    and setting requires_grad on the student). `self.anchor`'s tensors are the source state: the
    restore and `reset()` read them, `fork()` shares them.
    """

    uses_batch_stats = True

    def __init__(self, model: nn.Module, config: OC | None = None) -> None:
        super().__init__(model, config)
        # The source snapshot of the base class duplicated the anchor; point it at the anchor.
        self._source_state = self._realigned_source_state()
        self._bind_pairs()

    def _realigned_source_state(self) -> dict[str, torch.Tensor]:
        # The anchor's own tensors (after `.to()`, `_apply` has replaced its buffers with moved copies).
        anchor_state = self.anchor.state_dict(keep_vars=True)
        return {k: anchor_state[k] for k in self._source_state}

    def adapted_parameters(self) -> list[torch.Tensor]:
        return super().adapted_parameters() + list(self._teacher_params)

    def _build_copies(self) -> None:
        self.teacher = frozen_copy(self.model)
        self.anchor = frozen_copy(self.model)

    def _bind_pairs(self) -> None:
        """Aligned lists: trainable student params, their teacher and source (anchor) tensors."""
        teacher = dict(self.teacher.named_parameters())
        anchor = dict(self.anchor.named_parameters())
        student = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self._student_params = [p for _, p in student]
        self._teacher_params = [teacher[n] for n, _ in student]
        order = weight_bias_params(self.model)
        self._restore_params = [p for _, p in order]
        self._restore_sources = [anchor[n] for n, _ in order]

    def frozen_tensors(self) -> list[torch.Tensor]:
        return list(self.anchor.parameters()) + list(self.anchor.buffers())

    def prediction_model(self) -> nn.Module:
        return self.teacher

    @torch.no_grad()
    def update_teacher(self, momentum: float, reference: bool = False) -> None:
        (ema_update_reference if reference else ema_update_)(self._teacher_params, self._student_params, momentum)

    def restore(self, prob: float, reference: bool = False) -> None:
        if reference:
            stochastic_restore_reference(self._restore_params, self._restore_sources, prob, self.generator("cpu"))
        else:
            stochastic_restore_(self._restore_params, self._restore_sources, prob, self.generator(self.device))

    def reset(self) -> None:
        super().reset()
        self.teacher.load_state_dict(self.anchor.state_dict())

    def step_generators(self) -> tuple[torch.Generator, torch.Generator]:
        """Per-step generators for augmentation (CPU: parameters; device: noise).

        Seeded from one draw of the adapter's CPU generator every step, whether or not the step
        augments, so skipping augmentation (fast path) leaves later steps' draws unchanged.
        """
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator("cpu")))
        cpu = self._step_gens.setdefault("cpu", torch.Generator())
        cpu.manual_seed(seed)
        dev = self.device
        if dev.type == "cpu":
            return cpu, cpu
        gen = self._step_gens.setdefault(str(dev), torch.Generator(device=dev))
        gen.manual_seed(seed)
        return cpu, gen

    @property
    def _step_gens(self) -> dict[str, torch.Generator]:
        gens = self.__dict__.get("_step_generators")
        if gens is None:
            gens = self.__dict__["_step_generators"] = {}
        return gens


__all__ = [
    "LOSSES",
    "TeacherStudentAdapter",
    "augmentation_uncertainty",
    "ema_update_",
    "ema_update_reference",
    "frozen_copy",
    "card_defaults",
    "resolve_card_fields",
    "soft_cross_entropy",
    "stochastic_restore_",
    "stochastic_restore_reference",
    "symmetric_cross_entropy",
    "weight_bias_params",
]
