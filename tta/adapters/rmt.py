"""RMT: robust mean teacher for continual and gradual test-time adaptation (Döbler, Marsden, Yang;
CVPR 2023), read against the authors' code in the reference CTTA library
(mariodoebler/test-time-adaptation, ``classification/methods/rmt.py``).

Student (``self.model``: every parameter trained, BatchNorm with test-batch statistics, eval mode
otherwise), mean teacher (EMA of the student, momentum 0.999), a projector (Linear(D, 128) - ReLU -
Linear(128, 128), trained with the student) and class prototypes of the source model (the mean
pooled feature of every class over the source training set).

Per batch x, with f = pooled features (the classifier's input) and z = logits:
 1. x' = one CoTTA augmentation of x (one parameter draw for the batch);
    (f, z) = student(x), (f', z') = student(x'), t = teacher(x);
 2. self-training: L_st = mean over the batch of 0.5 SCE(z, t) + 0.5 SCE(z', t), with the symmetric
    cross-entropy SCE(a, b) = 0.5 CE(softmax b -> a) + 0.5 CE(softmax a -> b);
 3. contrastive: for every test sample, its nearest source prototype p (cosine similarity of f);
    the triples (p, f, f') go through the projector and are L2-normalised; L_cont is the supervised
    contrastive loss (Khosla et al. 2020) without labels over all 3B rows as anchors: each row's
    positives are the two other rows of its sample, the temperature 0.1;
 4. loss = lambda_ce_trg L_st + lambda_cont L_cont (+ lambda_ce_src CE on a labelled source batch,
    source replay); one optimizer step; teacher EMA over the student's parameters;
 5. return z + t (the ensemble of student and teacher, computed before the update).

Source data. The reference runs with source replay (lambda_ce_src = 1) after a mean-teacher warm-up
on 50,000 source samples (linear learning-rate ramp, SCE between student and teacher on source
images, EMA each step). The **source-free variant is the default here**: no replay
(``lambda_ce_src=0``), no warm-up (``warmup_samples=0``). The prototypes still come from source data:
they are a card artefact, ``tta build-prototypes --model CARD`` writes ``<card>.prototypes.safetensors``
(`ModelCard.artifact_output_path`; `compute_prototypes`: the source model set up as this adapter sets
it up, the card's training split in batches of 200), shipped for both cards; ``prototypes=FILE`` (the
CLI uses the card's file) or `RMT.set_prototypes` gives them to the adapter. Replay and warm-up
need labelled source images: ``source_dataset=NAME`` (``source_dataset=card`` on the CLI: the card's
dataset) loads that dataset's training split at construction, `RMT.set_source_data` takes tensors;
the warm-up then runs once, and `reset()` returns to the warmed-up student, teacher and optimizer
state, as the reference's does.

Presets: the reference's configurations (``cfgs/{cifar10_c,cifar100_c,imagenet_c}/rmt.yaml`` and
``conf.py``): cifar10/cifar100 Adam lr 1e-3 (beta 0.9), imagenet SGD lr 0.01, momentum 0.9, Nesterov,
source batches of 64 (the test batch size; 200 for CIFAR).

Deviations, documented:
- Source replay and warm-up draw their batches at random with replacement from the adapter's
  generator (the reference cycles through a shuffled loader), so they follow the adapter's seed and
  saved state; the source images themselves are not part of the saved state (give them again).
- The projector is initialised from the adapter's seed (reproducible); the reference from torch's
  global generator.
- Only the reference's contrast mode ``all`` is implemented (its ``one`` mode feeds unprojected
  features against projected ones).
- A model without a Linear classifier (whose input is the feature) is refused.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tta.adapters.registry import register_adapter
from tta.adapters.teacher import (
    TeacherConfig,
    TeacherStudentAdapter,
    seeded_global_rng,
    symmetric_cross_entropy,
    symmetric_cross_entropy_per_sample,
)
from tta.errors import ConfigError, DataNotFoundError, InvalidInputError, NoAdaptableLayerError
from tta.layers import calibrated_layers, replace_batchnorms
from tta.models.artifacts import read_artifact, write_artifact
from tta.models.features import AUTO_LAYERS, classifier_name, features_and_logits
from tta.models.normalize import Normalized

PROTOTYPES_FORMAT = "tta-rmt-prototypes/1"
PROTOTYPES_SUFFIX = ".prototypes.safetensors"


@dataclass
class RmtConfig(TeacherConfig):
    """RMT options; defaults: the reference's CIFAR-10-C configuration, source-free (module docstring).

    lambda_ce_trg: weight of the self-training (symmetric cross-entropy) loss (1.0).
    lambda_cont: weight of the contrastive loss (1.0).
    lambda_ce_src: weight of the cross-entropy on replayed labelled source batches (0 = source-free;
        the reference's 1.0 needs source data).
    warmup_samples: source samples of the mean-teacher warm-up (0 = none; the reference's 50,000).
    temperature: contrastive temperature (0.1).
    projection_dim: the projector's width (128).
    prototypes: a prototypes file (`tta build-prototypes`) or a model card whose
        ``<card>.prototypes.safetensors`` is used; None: call `RMT.set_prototypes` before the first
        batch (the CLI uses the card's file).
    feature_layer: the classifier module whose input is the feature (None = automatic, as the cards'
        ``feature_layer``; `tta.models.features`).
    source_dataset: dataset whose labelled training split is the source data of replay and warm-up
        (``card`` on the CLI: the card's dataset); None: `RMT.set_source_data` when needed.
    source_batch_size: images per replayed / warm-up source batch (the test batch size: 200; imagenet 64).
    """

    lambda_ce_trg: float = 1.0
    lambda_cont: float = 1.0
    lambda_ce_src: float = 0.0
    warmup_samples: int = 0
    temperature: float = 0.1
    projection_dim: int = 128
    prototypes: str | None = None
    feature_layer: str | None = None
    source_dataset: str | None = None
    source_batch_size: int = 200

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "cifar10": {"optimizer": "adam", "lr": 1e-3, "betas": (0.9, 0.999), "source_batch_size": 200},
        "cifar100": {"optimizer": "adam", "lr": 1e-3, "betas": (0.9, 0.999), "source_batch_size": 200},
        "imagenet": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": True, "source_batch_size": 64},
    }
    #: config keys a model card can supply (``--set source_dataset=card``)
    CARD_FIELDS: ClassVar[dict[str, str]] = {"source_dataset": "dataset"}
    #: config keys filled with the card's file when unset (`tta.adapters.teacher.card_defaults`)
    CARD_ARTIFACTS: ClassVar[dict[str, str]] = {"prototypes": PROTOTYPES_SUFFIX}
    REQUIRED_CARD_ARTIFACTS: ClassVar[dict[str, str]] = {"prototypes": "build-prototypes"}

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("lambda_ce_trg", "lambda_cont", "lambda_ce_src"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.projection_dim < 1 or self.source_batch_size < 1 or self.warmup_samples < 0:
            raise ConfigError("projection_dim and source_batch_size must be >= 1 and warmup_samples >= 0")
        if self.warmup_samples and self.warmup_samples < self.source_batch_size:
            raise ConfigError(f"warmup_samples ({self.warmup_samples}) must cover at least one source batch "
                              f"({self.source_batch_size})")

    @property
    def needs_source_data(self) -> bool:
        return self.lambda_ce_src > 0 or self.warmup_samples > 0


# ---------------------------------------------------------------------- the losses
def contrastive_loss(z: torch.Tensor, batch: int, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss without labels, every row an anchor (the reference's mode "all").

    `z`: (V * B, P) L2-normalised projections, view-major (rows i and i + B are views of one sample).
    Row i's positives are the other rows of its sample; its loss is the mean over them of
    -log(exp(z_i.z_p / T) / sum over a != i of exp(z_i.z_a / T)); the result is the mean over rows.
    """
    n = z.shape[0]
    logits = z @ z.T / temperature
    logits = logits - logits.amax(1, keepdim=True).detach()  # numerical stability
    sample = torch.arange(n, device=z.device) % batch
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    positives = (sample[:, None] == sample[None, :]) & ~self_mask
    denominator = logits.exp().masked_fill(self_mask, 0).sum(1, keepdim=True)
    log_prob = logits - denominator.log()
    mean_log_prob_pos = (log_prob * positives).sum(1) / positives.sum(1)
    return -mean_log_prob_pos.mean()


def nearest_prototypes(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """For every row of `features` (B, D), the row of `prototypes` (K, D) of highest cosine similarity."""
    similarity = F.cosine_similarity(prototypes.unsqueeze(1), features.unsqueeze(0), dim=-1)  # (K, B)
    return prototypes[similarity.argmax(0)]


# ---------------------------------------------------------------------- model introspection
def classifier_layer(model: nn.Module, layer: str | None = None) -> nn.Linear:
    """The Linear classifier whose input is the pooled feature (`tta.models.features`' rule)."""
    net = model.model if isinstance(model, Normalized) else model
    if layer is not None and layer not in AUTO_LAYERS:
        try:
            head = net.get_submodule(layer)
        except AttributeError as exc:
            raise NoAdaptableLayerError(f"rmt: {type(net).__name__} has no module named {layer!r}") from exc
    elif hasattr(net, "forward_head") and hasattr(net, "get_classifier"):  # timm
        head = net.get_classifier()
    elif hasattr(net, "forward_features") and hasattr(net, "fc"):  # built-in CIFAR ResNet / WideResNet
        head = net.fc
    else:
        head = net.get_submodule(classifier_name(net))
    if not isinstance(head, nn.Linear):
        raise NoAdaptableLayerError(f"rmt: the classifier {type(head).__name__} of {type(net).__name__} is not an "
                                    "nn.Linear: the feature dimension (its input) is unknown")
    return head


# ---------------------------------------------------------------------- the prototypes artefact
@torch.no_grad()
def compute_prototypes(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                       batch_size: int = 200, feature_layer: str | None = None,
                       device: str | torch.device = "cpu") -> torch.Tensor:
    """Class means (K, D) of the pooled features of labelled source `images` (uint8 or [0, 1] float
    NCHW, in the order to batch them), with the model set up as RMT sets it up (a copy: BatchNorm
    with the statistics of each batch, eval mode), as the reference computes its prototypes."""
    if images.dim() != 4 or images.shape[0] == 0 or labels.shape != (images.shape[0],):
        raise InvalidInputError(f"compute_prototypes: expected (N, C, H, W) images and N labels, got "
                                f"{tuple(images.shape)} / {tuple(labels.shape)}")
    if batch_size < 1:
        raise ConfigError(f"compute_prototypes: batch_size must be >= 1, got {batch_size}")
    net = copy.deepcopy(model).to(device).eval()
    replace_batchnorms(net, 0.0)
    dim = classifier_layer(net, feature_layer).in_features
    sums = torch.zeros(num_classes, dim, dtype=torch.float64, device=device)
    counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
    labels = labels.long()
    if bool((labels < 0).any()) or bool((labels >= num_classes).any()):
        raise InvalidInputError(f"compute_prototypes: labels must be in [0, {num_classes})")
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        y = labels[start : start + batch_size].to(device)
        features = features_and_logits(net, x, feature_layer)[0].double()
        sums.index_add_(0, y, features)
        counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise InvalidInputError(f"compute_prototypes: no source image of class(es) {missing}")
    return (sums / counts[:, None]).float().cpu()


def resolve_prototypes_path(prototypes: str | os.PathLike[str]) -> Path:
    """`prototypes` itself when it names a ``.safetensors`` file, else the prototypes file of the model
    card it names (`ModelCard.artifact_path`; where it would be written when there is none yet)."""
    path = Path(prototypes)
    if path.name.endswith(".safetensors"):
        return path
    from tta.models import get_card

    card = get_card(str(prototypes))
    return card.artifact_path(PROTOTYPES_SUFFIX) or card.artifact_output_path(PROTOTYPES_SUFFIX)


def validate_prototypes(prototypes: torch.Tensor) -> None:
    if not isinstance(prototypes, torch.Tensor) or prototypes.dim() != 2 or prototypes.shape[0] < 2:
        raise InvalidInputError("RMT prototypes must be a (classes >= 2, feature dim) tensor, got "
                                f"{getattr(prototypes, 'shape', type(prototypes).__name__)}")
    if not prototypes.is_floating_point() or not bool(torch.isfinite(prototypes).all()):
        raise InvalidInputError("RMT prototypes must be finite floating-point values")


def save_prototypes(path: str | os.PathLike[str], prototypes: torch.Tensor,
                    metadata: dict[str, str] | None = None) -> Path:
    """Write a prototypes file (safetensors: ``prototypes`` (K, D), with metadata) atomically."""
    validate_prototypes(prototypes)
    return write_artifact(path, {"prototypes": prototypes.float()}, PROTOTYPES_FORMAT, metadata)


def load_prototypes(path: str | os.PathLike[str]) -> tuple[torch.Tensor, dict[str, str]]:
    """(prototypes (K, D), metadata) of a prototypes file, validated."""
    tensors, meta = read_artifact(path, PROTOTYPES_FORMAT, "RMT prototypes", "tta build-prototypes --model CARD")
    if set(tensors) != {"prototypes"}:
        raise DataNotFoundError(f"{path}: an RMT prototypes file holds one tensor 'prototypes', got {sorted(tensors)}")
    validate_prototypes(tensors["prototypes"])
    return tensors["prototypes"], meta


# ---------------------------------------------------------------------- the adapter
@register_adapter("rmt")
class RMT(TeacherStudentAdapter[RmtConfig]):
    """RMT (Döbler et al., CVPR 2023); see the module docstring."""

    Config = RmtConfig

    def __init__(self, model: nn.Module, config: RmtConfig | None = None) -> None:
        super().__init__(model, config)
        if self.config.source_dataset is not None and self.config.needs_source_data:
            from tta.streams.source import source_split

            with torch.inference_mode(False):
                self.set_source_data(*source_split(self.config.source_dataset))

    def configure_model(self) -> None:
        cfg = self.config
        self.model.eval()
        replace_batchnorms(self.model, 0.0)
        self.model.requires_grad_(True)
        self.uses_batch_stats = bool(calibrated_layers(self.model))
        head = classifier_layer(self.model, cfg.feature_layer)
        self.num_classes = head.out_features
        with seeded_global_rng(self._seed, head.weight.device):
            self.projector = nn.Sequential(nn.Linear(head.in_features, cfg.projection_dim), nn.ReLU(),
                                           nn.Linear(cfg.projection_dim, cfg.projection_dim))
        self.projector.to(device=head.weight.device, dtype=head.weight.dtype)
        self._projector_source = {k: v.detach().clone() for k, v in self.projector.state_dict().items()}
        self.build_teacher()
        self._prototypes: torch.Tensor | None = None
        if cfg.prototypes:
            self.set_prototypes(load_prototypes(resolve_prototypes_path(cfg.prototypes))[0])
        self._source_data: tuple[torch.Tensor, torch.Tensor] | None = None
        self._warm_source: dict[str, Any] | None = None  # the warmed-up state reset() returns to

    def collect_params(self) -> list[nn.Parameter]:
        return list(self.model.parameters()) + list(self.projector.parameters())

    # ------------------------------------------------------------------ inputs from the source domain
    def set_prototypes(self, prototypes: torch.Tensor) -> None:
        """The source class prototypes (K, D): K the model's classes, D its feature dimension."""
        validate_prototypes(prototypes)
        dim = self.projector[0].in_features
        if tuple(prototypes.shape) != (self.num_classes, dim):
            raise InvalidInputError(f"rmt: prototypes of shape {tuple(prototypes.shape)}, the model needs "
                                    f"({self.num_classes} classes, {dim} feature dims); were they built for another card?")
        self._prototypes = prototypes.detach().to(device=self.device, dtype=self.projector[0].weight.dtype)

    def set_source_data(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Labelled source images (uint8 or [0, 1] float, (N, C, H, W)) for replay and warm-up; runs
        the warm-up (``warmup_samples``) the first time."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
            raise InvalidInputError(f"rmt: source images must be a non-empty (N, C, H, W) tensor, got "
                                    f"{getattr(images, 'shape', type(images).__name__)}")
        if self.in_channels and images.shape[1] != self.in_channels:
            images = images[:, : self.in_channels]  # grey datasets stored as RGB, for 1-channel models
        if not isinstance(labels, torch.Tensor) or labels.shape != (images.shape[0],) or labels.is_floating_point():
            raise InvalidInputError(f"rmt: source labels must be {images.shape[0]} integers, got "
                                    f"{getattr(labels, 'shape', type(labels).__name__)}")
        if bool((labels < 0).any()) or bool((labels >= self.num_classes).any()):
            raise InvalidInputError(f"rmt: source labels must be in [0, {self.num_classes})")
        self._source_data = (images, labels.long())
        if self.config.warmup_samples and self._warm_source is None:
            with torch.inference_mode(False), torch.enable_grad():
                self.warm_up()

    def _source_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._source_data is None:
            raise ConfigError("rmt: source replay / warm-up needs labelled source data: set source_dataset "
                              "(source_dataset=card on the CLI) or call adapter.set_source_data(images, labels)")
        images, labels = self._source_data
        idx = torch.randint(0, images.shape[0], (self.config.source_batch_size,), generator=self.generator("cpu"))
        x = images[idx].to(self.device)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        return x.to(self.projector[0].weight.dtype), labels[idx].to(self.device)

    def warm_up(self) -> None:
        """The reference's mean-teacher warm-up on source images (learning rate ramped up linearly)."""
        cfg = self.config
        assert self.optimizer is not None
        steps = cfg.warmup_samples // cfg.source_batch_size
        final = [group["lr"] for group in self.optimizer.param_groups]
        for i in range(steps):
            for group, lr in zip(self.optimizer.param_groups, final):
                group["lr"] = lr * (i + 1) / steps
            x, _ = self._source_batch()
            with torch.no_grad():
                teacher = self.teacher(x)
            self.apply_loss(symmetric_cross_entropy(self.model(x), teacher))
            self.update_teacher(cfg.ema_momentum)
        for group, lr in zip(self.optimizer.param_groups, final):
            group["lr"] = lr
        self._count(warmup_steps=steps)
        # reset() returns here, as the reference's (its state copies are taken after the warm-up)
        self._source_state = self._snapshot()
        self._warm_source = {
            "teacher": {k: v.detach().clone() for k, v in self.teacher.state_dict().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
        }

    # ------------------------------------------------------------------ one batch
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        prototypes = self._prototypes
        if prototypes is None:
            raise ConfigError("rmt has no source prototypes: pass prototypes=FILE (build it with `tta "
                              "build-prototypes --model CARD`) or call adapter.set_prototypes(...)")
        if cfg.lambda_ce_src > 0 and self._source_data is None:
            self._source_batch()  # raises the missing-source-data error before any change
        param_gen, noise_gen = self.step_generators()
        params = self.augment.draw(1, tuple(x.shape[-2:]), param_gen)
        x_aug = self.augment.apply(x, params, self.augment.noise(1, x, noise_gen))[0]
        features, logits = features_and_logits(self.model, x, cfg.feature_layer)
        features_aug, logits_aug = features_and_logits(self.model, x_aug, cfg.feature_layer)
        with torch.no_grad():
            teacher = self.teacher(x)
            nearest = nearest_prototypes(features.detach(), prototypes)
        triples = torch.stack((nearest, features, features_aug), dim=1)  # (B, 3, D)
        z = F.normalize(self.projector(torch.cat(triples.unbind(1), dim=0)), dim=1)  # view-major (3B, P)
        loss_cont = contrastive_loss(z, x.shape[0], cfg.temperature)
        loss_st = (0.5 * symmetric_cross_entropy_per_sample(logits, teacher)
                   + 0.5 * symmetric_cross_entropy_per_sample(logits_aug, teacher)).mean()
        loss = cfg.lambda_ce_trg * loss_st + cfg.lambda_cont * loss_cont
        if cfg.lambda_ce_src > 0:
            xs, ys = self._source_batch()
            loss = loss + cfg.lambda_ce_src * F.cross_entropy(self.model(xs), ys)
        outputs = (logits + teacher).detach()
        self.apply_loss(loss)
        self.update_teacher(cfg.ema_momentum)
        return outputs

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        super().reset()
        self.projector.load_state_dict(self._projector_source)
        if self._warm_source is not None and self.optimizer is not None:
            self.optimizer.load_state_dict(self._warm_source["optimizer"])

    def reset_teacher(self) -> None:
        if self._warm_source is None:
            super().reset_teacher()
        else:
            self.teacher.load_state_dict(self._warm_source["teacher"])

    def _after_move(self) -> None:
        super()._after_move()
        p = self.projector[0].weight
        self._projector_source = {k: v.to(device=p.device, dtype=p.dtype) for k, v in self._projector_source.items()}
        if self._prototypes is not None:
            self._prototypes = self._prototypes.to(device=p.device, dtype=p.dtype)


__all__ = [
    "PROTOTYPES_SUFFIX",
    "RMT",
    "RmtConfig",
    "classifier_layer",
    "compute_prototypes",
    "contrastive_loss",
    "load_prototypes",
    "nearest_prototypes",
    "resolve_prototypes_path",
    "save_prototypes",
]
