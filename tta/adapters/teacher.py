"""The teacher-student family's one base: CoTTA, ViDA, VDP, RMT and RoTTA are built on it.

Every member trains a student, predicts with a teacher that follows the student by an exponential
moving average, and (all but RoTTA) compares the two on the test batch. What they share lives here,
written once:

- configs: `TeacherConfig` (the EMA momentum), `AugmentedTeacherConfig` (+ the augmented-view
  ensemble and the anchor threshold: views, ``ap``, loss, views per forward, their memory format)
  and `RestoringTeacherConfig` (+ the stochastic restore), each with its validation;
- `ema_update_`: teacher <- m * teacher + (1 - m) * student over whole parameter lists with two
  `torch._foreach_*` calls; `ema_update_reference` is the literal per-parameter loop of the reference
  code (the oracle of the tests and of CoTTA's `reference_mode`);
- `stochastic_restore_`: every element of every listed parameter is reset to its source value with
  probability p. One uniform draw covers all parameters (on the parameters' device, from the
  adapter's generator), split into per-parameter weights, and one `torch._foreach_lerp_` applies it
  (lerp with a 0/1 weight returns exactly the start or the end value). On a CPU generator the draw
  consumes the stream exactly like the reference's per-parameter `torch.rand(p.shape)` calls, so
  both paths give bit-identical masks. `stochastic_restore_reference` is the literal loop;
- the losses (soft and symmetric cross-entropy) and ViDA's augmentation uncertainty;
- `TeacherStudentAdapter`: student (``self.model``), EMA teacher (the predictor), the per-step
  random generators, the augmented-view ensemble of the teacher (`teacher_views`: chunks of views
  in one batched forward each, with per-view "ghost" BatchNorm statistics so a chunk computes what
  separate forwards would) and the anchor-confidence test (`anchor_confidence`). The teacher is a
  copy of the configured student built ONCE, sharing the student's frozen tensors;
- `AnchoredTeacherAdapter`: adds a frozen source copy ("anchor", CoTTA's) whose tensors double as the
  source state used by `reset()` and by the stochastic restore (no extra state copy, no per-step
  deep copy); `fork()` shares them.

Reproducibility: every step draws one seed from the adapter's CPU generator (`step_generators`);
the augmentation parameters come from a CPU generator seeded with it and the noise from a generator
on the batch's device seeded with it. Forwards in train mode (dropout, stochastic depth) run under
`seeded_global_rng`, seeded from the adapter's generator, so they too follow the adapter's seed and
its saved state.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

import torch
from torch import nn

from tta.adapters.base import Adapter
from tta.adapters.config import CARD, OptimConfig
from tta.augment import CottaAugment, is_grey_rgb, stack_views
from tta.errors import ConfigError
from tta.layers import calibrated_layers

MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


# ---------------------------------------------------------------------- configs
@dataclass
class TeacherConfig(OptimConfig):
    """Options of every teacher-student adapter.

    ema_momentum: after every update, teacher <- m * teacher + (1 - m) * student (0.999).
    """

    ema_momentum: float = 0.999

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.ema_momentum <= 1.0:
            raise ConfigError(f"ema_momentum must be in [0, 1], got {self.ema_momentum}")


@dataclass
class AugmentedTeacherConfig(TeacherConfig):
    """+ the teacher's augmented-view ensemble and CoTTA's anchor threshold.

    n_views: augmented teacher passes (10, ViDA's and VDP's; CoTTA 32).
    ap: anchor-confidence threshold: below it (mean max-softmax of the source model on the batch)
        the view-averaged teacher is the target (0.92, CoTTA's CIFAR-10 value; ``ap=card`` on the CLI
        takes the card's ``cotta_threshold``).
    loss: ``soft_ce`` (CIFAR) or ``symmetric_ce`` (ImageNet).
    views_per_forward: views per batched (ghost-BN) teacher forward; 0 = auto: all views in one
        forward on GPUs (many small forwards become one), 1 on CPUs, where a bigger batch runs no
        faster and ghost BN costs more than the fused per-view BatchNorm (timm resnet50, 2 views x
        16 images at 224 px: 16.3 s batched vs 13.8 s separate on the 2-core box). Lower it to bound
        memory (large images).
    views_memory_format: memory format of the augmented views fed to the teacher: ``channels_last``,
        ``contiguous`` (NCHW) or ``auto`` = channels_last for 4-D images on every device. On CPUs
        oneDNN's convolutions run NHWC natively (1.24x faster CoTTA steps for ResNet-20, B=200,
        N=32 on the 2-core box, outputs within 3e-6 of NCHW); on an H200 cuDNN's TF32
        convolutions are faster on it too (CoTTA steps 1.21-1.25x faster for the ResNet-20 card,
        B=200, N=32; 1.15-1.26x for resnet50 at 224 px, B=64, N=32; BENCHMARKS.md "GPU"). Default ``contiguous`` (ViDA and VDP: the values they gave before the
        views were shared); CoTTA's default ``auto``.
    """

    n_views: int = 10
    ap: float = 0.92
    loss: Literal["soft_ce", "symmetric_ce"] = "soft_ce"
    views_per_forward: int = 0
    views_memory_format: Literal["auto", "channels_last", "contiguous"] = "contiguous"

    #: fewest views the adapter can use (ViDA and VDP need a variance or a mean over >= 2)
    MIN_VIEWS: ClassVar[int] = 1
    #: config keys a model card can supply (``--set ap=card``): config key -> card attribute
    CARD_FIELDS: ClassVar[dict[str, str]] = {"ap": "cotta_threshold"}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_views < self.MIN_VIEWS:
            raise ConfigError(f"n_views must be >= {self.MIN_VIEWS}, got {self.n_views}")
        if self.views_per_forward < 0:
            raise ConfigError(f"views_per_forward must be >= 0 (0 = auto), got {self.views_per_forward}")
        if self.views_memory_format not in MEMORY_FORMATS:
            raise ConfigError(f"views_memory_format must be one of {', '.join(MEMORY_FORMATS)}, "
                              f"got {self.views_memory_format!r}")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")


@dataclass
class RestoringTeacherConfig(AugmentedTeacherConfig):
    """+ CoTTA's stochastic restore.

    restore_prob: per-element probability of resetting a trained weight/bias to its source value
        after every update (CoTTA's RST, 0.01).
    """

    restore_prob: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.restore_prob <= 1.0:
            raise ConfigError(f"restore_prob must be in [0, 1], got {self.restore_prob}")


TC = TypeVar("TC", bound=TeacherConfig)
AC = TypeVar("AC", bound=AugmentedTeacherConfig)


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
def soft_cross_entropy_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """-(softmax(teacher) * log_softmax(student)).sum(1): one value per sample."""
    return -(teacher_logits.softmax(1) * student_logits.log_softmax(1)).sum(1)


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Batch mean of `soft_cross_entropy_per_sample` (CoTTA/ViDA, CIFAR)."""
    return soft_cross_entropy_per_sample(student_logits, teacher_logits).mean()


def symmetric_cross_entropy_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """0.5 * CE(teacher -> student) + 0.5 * CE(student -> teacher), one value per sample."""
    a = -(teacher_logits.softmax(1) * student_logits.log_softmax(1)).sum(1)
    b = -(student_logits.softmax(1) * teacher_logits.log_softmax(1)).sum(1)
    return 0.5 * a + 0.5 * b


def symmetric_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Batch mean of `symmetric_cross_entropy_per_sample` (CoTTA/ViDA, ImageNet; RMT)."""
    return symmetric_cross_entropy_per_sample(student_logits, teacher_logits).mean()


LOSSES = {"soft_ce": soft_cross_entropy, "symmetric_ce": symmetric_cross_entropy}


def augmentation_uncertainty(view_logits: torch.Tensor) -> torch.Tensor:
    """ViDA's uncertainty: 0.1 * mean over batch and classes of the (unbiased) variance across views.

    `view_logits` is (V, B, K).
    """
    return 0.1 * view_logits.var(dim=0).mean()


# ---------------------------------------------------------------------- module helpers
def frozen_copy(model: nn.Module, shared: Iterable[torch.Tensor] = ()) -> nn.Module:
    """A deep copy with every parameter detached from autograd (built once, never per step).

    Tensors in `shared` (the source model's frozen weights) are not copied: the copy uses them.
    """
    clone = copy.deepcopy(model, {id(t): t for t in shared})
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


def views_per_forward(configured: int, n_views: int, device: torch.device) -> int:
    """Views per batched forward: the configured count, or auto (0): all on GPUs, 1 on CPUs."""
    if configured:
        return min(configured, n_views)
    return 1 if device.type == "cpu" else n_views


def views_channels_last(configured: str, x: torch.Tensor) -> bool:
    """Whether the views are fed channels_last: unless configured ``contiguous``, for 4-D images."""
    return x.dim() == 4 and configured != "contiguous"


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """torch's global generators (CPU, and `device`'s when it is a GPU) seeded with `seed` inside the
    block and restored after it: dropout / stochastic depth in train-mode forwards then follow the
    adapter's own seed instead of whatever the caller's global state is."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.manual_seed(seed)
        yield


# ---------------------------------------------------------------------- CLI: values from the model card
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
    """CLI rule: resolve ``key=card`` markers from the model card (``CARD_FIELDS``), and give every
    unset config key listed in ``CARD_ARTIFACTS`` (key -> file suffix) the card's file
    ``<card><suffix>`` when it exists (`ModelCard.artifact_path`: ViDA's warmed-up adapters, RMT's
    source prototypes); a missing file listed in ``REQUIRED_CARD_ARTIFACTS`` (key -> the ``tta``
    command that builds it) is an error naming that command."""
    from tta.models import get_card

    overrides = resolve_card_fields(config_cls, overrides, lambda: get_card(card_name))
    required: Mapping[str, str] = getattr(config_cls, "REQUIRED_CARD_ARTIFACTS", {})
    for key, suffix in getattr(config_cls, "CARD_ARTIFACTS", {}).items():
        if overrides.get(key) is None:
            card = get_card(card_name)
            path = card.artifact_path(suffix)
            if path is not None:
                overrides = {**overrides, key: str(path)}
            elif key in required:
                raise ConfigError(
                    f"{config_cls.__name__}: {key} of card {card.name} ({card.name}{suffix}) not found (looked for "
                    f"at {card.artifact_output_path(suffix)}): build it with `tta {required[key]} --model "
                    f"{card_name}` or pass --set {key}=PATH"
                )
    return overrides


# ---------------------------------------------------------------------- base classes
class TeacherStudentAdapter(Adapter[TC]):
    """Student (``self.model``, trained) + EMA teacher (``self.teacher``, the predictor).

    Subclasses configure the student in `configure_model()` and end it with `build_teacher()`
    (after swapping layers and setting requires_grad). The teacher pairs with the student's trained
    parameters by name (`_bind_pairs`); `update_teacher` moves them by EMA.
    """

    uses_batch_stats = True

    def __init__(self, model: nn.Module, config: TC | None = None) -> None:
        super().__init__(model, config)
        self._bind_pairs()

    # ------------------------------------------------------------------ construction
    def build_teacher(self) -> None:
        """The teacher: a copy of the configured student sharing its frozen (never trained) tensors;
        the augmentation of the view ensemble."""
        self.teacher = frozen_copy(self.model, shared=self._student_frozen())
        self._teacher_bn = calibrated_layers(self.teacher)
        self.augment = CottaAugment()

    def _student_frozen(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if not p.requires_grad]

    def _bind_pairs(self) -> None:
        """Aligned lists of the trained student parameters and their teacher counterparts."""
        teacher = dict(self.teacher.named_parameters())
        student = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self._student_params = [p for _, p in student]
        self._teacher_params = [teacher[n] for n, _ in student]

    # ------------------------------------------------------------------ roles
    def prediction_model(self) -> nn.Module:
        return self.teacher

    def anchor_model(self) -> nn.Module:
        """The source model whose confidence decides between the clean and the view-averaged target."""
        raise NotImplementedError(f"{type(self).__name__} has no anchor model")

    def adapted_parameters(self) -> list[torch.Tensor]:
        return super().adapted_parameters() + list(self._teacher_params)

    # ------------------------------------------------------------------ the shared steps
    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        ema_update_(self._teacher_params, self._student_params, momentum)

    def reset(self) -> None:
        super().reset()
        self.reset_teacher()

    def reset_teacher(self) -> None:
        """Back to the source: the teacher (and what else the adapter learns outside ``self.model``)."""
        self.teacher.load_state_dict(self._source_state, strict=False)

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

    def train_mode_rng(self) -> contextlib.AbstractContextManager[None]:
        """`seeded_global_rng` seeded from the adapter's CPU generator (one draw): for forwards in
        train mode, whose dropout masks come from torch's global generators."""
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator("cpu")))
        return seeded_global_rng(seed, self.device)

    @property
    def _step_gens(self) -> dict[str, torch.Generator]:
        gens = self.__dict__.get("_step_generators")
        if gens is None:
            gens = self.__dict__["_step_generators"] = {}
        return gens

    @torch.no_grad()
    def anchor_confidence(self, x: torch.Tensor) -> float:
        """Mean over the batch of the anchor's max softmax probability (CoTTA's test against ``ap``)."""
        return float(self.anchor_model()(x).softmax(1).amax(1).mean())

    @torch.no_grad()
    def teacher_views(self, x: torch.Tensor, gens: tuple[torch.Generator, torch.Generator]) -> Iterator[torch.Tensor]:
        """Teacher logits on ``n_views`` CoTTA augmentations of `x`, one chunk of ``views_per_forward``
        views at a time: (k, B, K) per chunk.

        The parameters of all views are drawn first (on ``gens[0]``), then each chunk's noise (on
        ``gens[1]``), so any chunking consumes the generators alike. A chunk runs as one forward of
        its stacked views with per-view (ghost) BatchNorm statistics in the teacher: the values of
        separate forwards.
        """
        cfg = self.config
        assert isinstance(cfg, AugmentedTeacherConfig)
        param_gen, noise_gen = gens
        n = cfg.n_views
        chunk = views_per_forward(cfg.views_per_forward, n, x.device)
        channels_last = views_channels_last(cfg.views_memory_format, x)
        grey = is_grey_rgb(x)  # once per batch, not per chunk of views
        params = self.augment.draw(n, tuple(x.shape[-2:]), param_gen)
        teacher = self.prediction_model()
        for start in range(0, n, chunk):
            k = min(chunk, n - start)
            noise = self.augment.noise(k, x, noise_gen)
            views = self.augment.apply(x, params.views(start, start + k), noise, grey)
            for layer in self._teacher_bn:
                layer.ghost_groups = k
            try:
                batch = stack_views(views)
                if channels_last:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                yield teacher(batch).view(k, x.shape[0], -1)
            finally:
                for layer in self._teacher_bn:
                    layer.ghost_groups = 1

    def view_logits(self, x: torch.Tensor, gens: tuple[torch.Generator, torch.Generator]) -> torch.Tensor:
        """All of `teacher_views`: (V, B, K)."""
        return torch.cat(list(self.teacher_views(x, gens)))


class AnchoredTeacherAdapter(TeacherStudentAdapter[AC]):
    """+ a frozen source copy of the student (``self.anchor``, CoTTA's anchor).

    The anchor's tensors are the source state: the stochastic restore and `reset()` read them,
    `fork()` shares them.
    """

    def __init__(self, model: nn.Module, config: AC | None = None) -> None:
        super().__init__(model, config)
        # The source snapshot of the base class duplicated the anchor; point it at the anchor.
        self._source_state = self._realigned_source_state()

    def build_teacher(self) -> None:
        super().build_teacher()
        self.anchor = frozen_copy(self.model, shared=self._student_frozen())

    def _realigned_source_state(self) -> dict[str, torch.Tensor]:
        # The anchor's own tensors (after `.to()`, `_apply` has replaced its buffers with moved copies).
        anchor_state = self.anchor.state_dict(keep_vars=True)
        return {k: anchor_state[k] for k in self._source_state}

    def _bind_pairs(self) -> None:
        super()._bind_pairs()
        anchor = dict(self.anchor.named_parameters())
        order = weight_bias_params(self.model)
        self._restore_params = [p for _, p in order]
        self._restore_sources = [anchor[n] for n, _ in order]

    def frozen_tensors(self) -> list[torch.Tensor]:
        return list(self.anchor.parameters()) + list(self.anchor.buffers()) + self._student_frozen()

    def anchor_model(self) -> nn.Module:
        return self.anchor

    def restore(self, prob: float) -> None:
        stochastic_restore_(self._restore_params, self._restore_sources, prob, self.generator(self.device))

    def restore_reference(self, prob: float) -> None:
        stochastic_restore_reference(self._restore_params, self._restore_sources, prob, self.generator("cpu"))


__all__ = [
    "AnchoredTeacherAdapter",
    "AugmentedTeacherConfig",
    "LOSSES",
    "RestoringTeacherConfig",
    "TeacherConfig",
    "TeacherStudentAdapter",
    "augmentation_uncertainty",
    "card_defaults",
    "ema_update_",
    "ema_update_reference",
    "frozen_copy",
    "resolve_card_fields",
    "seeded_global_rng",
    "soft_cross_entropy",
    "soft_cross_entropy_per_sample",
    "stochastic_restore_",
    "stochastic_restore_reference",
    "symmetric_cross_entropy",
    "symmetric_cross_entropy_per_sample",
    "views_channels_last",
    "views_per_forward",
    "weight_bias_params",
]
