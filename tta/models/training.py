"""Source training on Fashion-MNIST (the shipped reference checkpoints) and the CoTTA threshold helper.

Recipe (CNN): SGD with Nesterov momentum 0.9, weight decay 5e-4, batch 128, one-cycle schedule
(15% warm-up to `lr`=0.1, cosine decay), random crop (pad 4, zero fill) + horizontal flip.
ViTs default to AdamW (lr 1e-3, weight decay 0.05) with the same schedule and augmentation.
Images stay uint8 in memory and are augmented batch-wise (no per-sample Python loop).

Objectives: ``"ce"`` (cross-entropy of the linear head) or ``"knn"`` (AdaNPC's kNN-vote objective
against a queue of recent training features, `tta.models.knn_objective`; the head is then a linear
probe fitted on the frozen features after training, and the AdaNPC source memory is written beside
the card).
"""

from __future__ import annotations

import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from tta.errors import ConfigError
from tta.models.builders import build_model
from tta.models.cards import ModelCard, load, wrap_normalization
from tta.models.checkpoint import save_state_dict
from tta.models.features import default_feature_layer, extract_features
from tta.models.knn_objective import (
    FeatureQueue,
    annealed_temperature,
    fit_linear_probe,
    knn_vote_loss,
    knn_vote_scores,
)
from tta.streams.fashion_mnist import load_fashion_mnist

DATASETS = {"fashion-mnist": (load_fashion_mnist, 10)}


@dataclass
class TrainConfig:
    arch: str = "resnet20"
    out: str = "models/resnet20-fmnist"  # writes <out>.safetensors and <out>.yaml
    dataset: str = "fashion-mnist"
    epochs: int = 10
    batch_size: int = 128
    optimizer: str | None = None  # "sgd" | "adamw"; None: adamw for ViTs, sgd otherwise
    lr: float | None = None  # None: 0.1 (sgd) / 1e-3 (adamw)
    weight_decay: float | None = None  # None: 5e-4 (sgd) / 0.05 (adamw)
    momentum: float = 0.9
    warmup_frac: float = 0.15
    crop_padding: int = 4
    flip: bool = True
    seed: int = 0
    eval_every: int = 0  # evaluate on the test split every N epochs (0: only at the end)
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    data_dir: str | None = None
    limit_train: int | None = None  # use only the first N train / test images (smoke tests)
    limit_test: int | None = None
    command: str | None = None  # recorded in the card
    device: str = "cpu"  # training device ("cuda" on a GPU machine); evaluation and the card's figures run on the CPU
    objective: str = "ce"  # "ce" | "knn" (AdaNPC's kNN-vote objective, tta.models.knn_objective)
    knn_queue: int = 1000  # knn: queue rows (the reference's small-image default)
    knn_k: int = 10  # knn: neighbours voting during training (the reference's small-image default)
    knn_tau_start: float = 1.0  # knn: vote temperature, annealed linearly ...
    knn_tau_end: float = 0.1  # ... to this value at the last step
    probe_weight_decay: float = 1e-4  # knn: L2 of the linear probe
    memory_rows: int | None = None  # knn: rows of the shipped AdaNPC memory (first N train images; None: all)
    memory_dtype: str = "float16"  # knn: row dtype of the shipped memory

    def resolved(self) -> TrainConfig:
        if self.dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {self.dataset!r}; choose from {sorted(DATASETS)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs and batch_size must be >= 1")
        if any(v is not None and v < 1 for v in (self.limit_train, self.limit_test)):
            raise ConfigError("limit_train / limit_test must be >= 1 when given")
        if self.objective not in ("ce", "knn"):
            raise ConfigError(f"objective must be 'ce' or 'knn', got {self.objective!r}")
        if self.objective == "knn":
            if self.knn_queue < 1 or not 1 <= self.knn_k <= min(self.knn_queue, 256):
                raise ConfigError(f"knn objective: need knn_queue >= 1 and 1 <= knn_k <= min(knn_queue, 256), "
                                  f"got queue {self.knn_queue}, k {self.knn_k}")
            if not (self.knn_tau_start > 0 and self.knn_tau_end > 0):
                raise ConfigError("knn objective: temperatures must be > 0")
            if self.memory_rows is not None and self.memory_rows < 1:
                raise ConfigError("memory_rows must be >= 1 when given")
            if self.memory_dtype not in ("float32", "float16"):
                raise ConfigError(f"memory_dtype must be 'float32' or 'float16', got {self.memory_dtype!r}")
        opt = self.optimizer or ("adamw" if "vit" in self.arch else "sgd")
        if opt not in ("sgd", "adamw"):
            raise ConfigError(f"optimizer must be 'sgd' or 'adamw', got {opt!r}")
        lr = self.lr if self.lr is not None else (0.1 if opt == "sgd" else 1e-3)
        wd = self.weight_decay if self.weight_decay is not None else (5e-4 if opt == "sgd" else 0.05)
        return TrainConfig(**{**self.__dict__, "optimizer": opt, "lr": lr, "weight_decay": wd})


def to_tensor_uint8(images_nhwc: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) array -> uint8 (N, C, H, W) tensor (kept uint8: 4x less memory than float)."""
    return torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))


def augment(x: torch.Tensor, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, for a whole (N, C, H, W) batch."""
    n, c, h, w = x.shape
    if padding > 0:
        padded = F.pad(x, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        # Two gathers (rows, then columns): several times faster than one 4-D advanced index.
        rows = (dy[:, None] + torch.arange(h)).view(n, 1, h, 1).expand(n, c, h, w + 2 * padding)
        cols = (dx[:, None] + torch.arange(w)).view(n, 1, 1, w).expand(n, c, h, w)
        x = padded.gather(2, rows).gather(3, cols)
    if flip:
        mask = torch.rand(n, generator=generator) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


@torch.no_grad()
def predict_batches(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Logits for uint8 or float [0, 1] NCHW images, evaluated in fixed-size chunks."""
    model.eval()
    device = _device_of(model)
    return torch.cat([model(_as_float(images[i:i + batch_size].to(device))).cpu()
                      for i in range(0, len(images), batch_size)])


def _machine(device: torch.device) -> str:
    """The training machine as the card records it."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    return f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def _device_of(model: nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> int:
    """Number of correctly classified images (eval mode, fixed batch size so results are reproducible)."""
    return int((predict_batches(model, images, batch_size).argmax(1) == labels).sum())


def cotta_threshold(model: nn.Module, images: torch.Tensor, quantile: float = 0.05, margin: float = 0.05,
                    batch_size: int = 500) -> float:
    """CoTTA's augmentation-averaging threshold (Wang et al., CVPR 2022): the `quantile` (5%) quantile of
    the source model's max-softmax confidence on source images, minus `margin` (0.05)."""
    if len(images) == 0:
        raise ConfigError("cotta_threshold needs at least one source image")
    conf = predict_batches(model, images, batch_size).softmax(1).amax(1)
    return float(torch.quantile(conf.double(), quantile)) - margin


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of uint8 NCHW images in [0, 1] units (chunked: no full float copy)."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for i in range(0, len(images), chunk):
        x = images[i:i + chunk].double().div_(255.0)
        total += x.sum((0, 2, 3))
        total_sq += x.square().sum((0, 2, 3))
    count = images.numel() / images.shape[1]
    mean = total / count
    std = (total_sq / count - mean.square()).sqrt()
    return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on norm parameters and biases (standard for both recipes).
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def train_source(cfg: TrainConfig, progress: bool = True) -> ModelCard:
    """Train `cfg.arch` on the dataset's train split, write `<out>.safetensors` + `<out>.yaml`, return the card."""
    cfg = cfg.resolved()
    out = Path(cfg.out)
    name = out.name
    loader, num_classes = DATASETS[cfg.dataset]
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)

    train_x_np, train_y_np = loader("train", cfg.data_dir)
    test_x_np, test_y_np = loader("test", cfg.data_dir)
    train_x_np, train_y_np = train_x_np[:cfg.limit_train], train_y_np[:cfg.limit_train]
    test_x_np, test_y_np = test_x_np[:cfg.limit_test], test_y_np[:cfg.limit_test]
    train_x, train_y = to_tensor_uint8(train_x_np), torch.from_numpy(train_y_np)
    test_x, test_y = to_tensor_uint8(test_x_np), torch.from_numpy(test_y_np)
    del train_x_np, test_x_np
    mean, std = channel_stats(train_x)
    in_chans, h, w = train_x.shape[1:]

    net = build_model(cfg.arch, num_classes=num_classes, in_chans=in_chans, **cfg.arch_kwargs)
    model = wrap_normalization(net, mean, std).to(memory_format=torch.channels_last)
    optimizer = _optimizer(model, cfg)
    steps_per_epoch = math.ceil(len(train_x) / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=cfg.warmup_frac,
        anneal_strategy="cos", div_factor=10.0, final_div_factor=100.0,
    )
    n_params = sum(p.numel() for p in net.parameters())
    print(f"training {cfg.arch} ({n_params / 1e6:.2f}M params) on {cfg.dataset}: {len(train_x)} images, "
          f"{cfg.epochs} epochs x {steps_per_epoch} steps, {cfg.optimizer} lr {cfg.lr} wd {cfg.weight_decay}, "
          f"{torch.get_num_threads()} threads", flush=True)

    device = torch.device(cfg.device)
    model.to(device)
    knn = cfg.objective == "knn"
    queue = _prefilled_queue(model, train_x, train_y, cfg, gen) if knn else None
    total_steps = cfg.epochs * steps_per_epoch
    epoch_log = []
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(train_x), generator=gen)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress,
                   mininterval=5.0, file=sys.stdout)
        for step in bar:
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            x = _as_float(augment(train_x[idx], cfg.crop_padding, cfg.flip, gen).to(device, non_blocking=True))
            x = x.contiguous(memory_format=torch.channels_last)
            y = train_y[idx].to(device, non_blocking=True)
            if queue is not None:
                feats = extract_features(model, x)
                tau = annealed_temperature(epoch * steps_per_epoch + step, total_steps, cfg.knn_tau_start,
                                           cfg.knn_tau_end)
                logits = knn_vote_scores(feats, *queue.rows(), num_classes, cfg.knn_k, tau)
                loss = knn_vote_loss(logits, y)
            else:
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if queue is not None:
                queue.push(feats, y)
            loss_sum += loss.detach() * len(idx)
            correct += (logits.detach().argmax(1) == y).sum()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.4f}")
        record = {"epoch": epoch + 1, "train_loss": round(float(loss_sum) / len(train_x), 4),
                  "train_acc": round(100.0 * float(correct) / len(train_x), 2),
                  "time_s": round(time.perf_counter() - t0, 1)}
        if cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0) and epoch + 1 < cfg.epochs:
            if queue is not None:  # the vote over the training queue (the head is not trained yet)
                scores = _knn_predict(model, test_x, *queue.rows(), num_classes, cfg.knn_k, cfg.knn_tau_end)
                record["test_acc_queue_vote"] = round(100.0 * float((scores.argmax(1) == test_y).float().mean()), 2)
            else:
                record["test_acc"] = round(100.0 * evaluate(model, test_x, test_y) / len(test_x), 2)
        epoch_log.append(record)
        print(" ".join(f"{k}={v}" for k, v in record.items()), flush=True)
    train_time = time.perf_counter() - start

    model = model.to(memory_format=torch.contiguous_format).eval()  # still on the training device
    knn_report: dict[str, Any] = {}
    if knn:
        train_feats = _features(model, train_x)
        weight, bias, probe_loss = fit_linear_probe(train_feats, train_y, num_classes, cfg.probe_weight_decay)
        with torch.no_grad():
            net.fc.weight.copy_(weight)
            net.fc.bias.copy_(bias)
        knn_report = {"probe_train_loss": round(probe_loss, 4), "train_feats": train_feats}
    threshold = cotta_threshold(model, train_x)
    model.cpu()
    ckpt = out.with_name(f"{name}.safetensors")
    sha = save_state_dict(net.state_dict(), ckpt, metadata={"arch": cfg.arch, "card": name})
    card = ModelCard(
        name=name, arch=cfg.arch, num_classes=num_classes, checkpoint=ckpt.name, sha256=sha,
        input_size=(int(in_chans), int(h), int(w)), mean=tuple(mean), std=tuple(std), arch_kwargs=dict(cfg.arch_kwargs),
        feature_layer=default_feature_layer(net),
        dataset=cfg.dataset, cotta_threshold=round(threshold, 4),
        training={
            "epochs": cfg.epochs, "batch_size": cfg.batch_size, "optimizer": cfg.optimizer, "lr": cfg.lr,
            "weight_decay": cfg.weight_decay, "schedule": f"one-cycle cosine, {cfg.warmup_frac:.0%} warm-up",
            "augmentation": f"random crop pad {cfg.crop_padding}" + (" + horizontal flip" if cfg.flip else ""),
            "seed": cfg.seed, "train_images": len(train_x), "parameters": n_params, "train_time_s": round(train_time, 1),
            "machine": _machine(device),
            "epochs_log": epoch_log,
            **({"objective": "knn", "knn": {
                "queue": cfg.knn_queue, "k": cfg.knn_k,
                "temperature": f"linear {cfg.knn_tau_start} -> {cfg.knn_tau_end} over training",
                "similarity": "cosine", "loss": "-log(vote[y] + 1e-5)",
                "head": f"linear probe (L-BFGS logistic regression on frozen train features, "
                        f"L2 {cfg.probe_weight_decay}, final loss {knn_report['probe_train_loss']})",
            }} if knn else {}),
        },
        command=cfg.command,
    )
    card.save(out.with_name(f"{name}.yaml"))
    # The recorded accuracy is measured on the model exactly as `tta.models.load` returns it.
    loaded = load(card)
    card.clean_correct = evaluate(loaded, test_x, test_y)
    card.num_test = len(test_x)
    card.clean_accuracy = round(100.0 * card.clean_correct / len(test_x), 2)
    if knn:
        card.training["knn"].update(_write_knn_memory(loaded, card, knn_report["train_feats"], train_y, test_x,
                                                      test_y, cfg))
    card.save(card.path)
    print(f"wrote {ckpt} and {card.path}: clean accuracy {card.clean_accuracy}% "
          f"({card.clean_correct}/{card.num_test}), cotta_threshold {card.cotta_threshold}, "
          f"train time {train_time / 60:.1f} min", flush=True)
    return card


# ---------------------------------------------------------------------- kNN objective helpers
@torch.no_grad()
def _features(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Pooled features (N, D) of uint8/[0, 1] images, in the model's current mode, fixed-size chunks."""
    device = _device_of(model)
    return torch.cat([extract_features(model, _as_float(images[i:i + batch_size].to(device))).float().cpu()
                      for i in range(0, len(images), batch_size)])


@torch.no_grad()
def _prefilled_queue(model: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor, cfg: TrainConfig,
                     gen: torch.Generator) -> FeatureQueue:
    """The training queue, filled with features of `knn_queue` random (augmented) training images
    under the initial network in train mode, so the first step already has neighbours."""
    idx = torch.randperm(len(train_x), generator=gen)[:cfg.knn_queue]
    x = augment(train_x[idx], cfg.crop_padding, cfg.flip, gen)
    model.train()
    feats = _features(model, x)
    queue = FeatureQueue(cfg.knn_queue, feats.shape[1], device=_device_of(model))
    queue.push(feats.to(queue.features.device), train_y[idx])
    return queue


@torch.no_grad()
def _knn_predict(model: nn.Module, images: torch.Tensor, memory: torch.Tensor, memory_labels: torch.Tensor,
                 num_classes: int, k: int, temperature: float) -> torch.Tensor:
    """kNN-vote scores (N, C) of images against L2-normalised memory rows (eval mode)."""
    was_training = model.training
    model.eval()
    scores = knn_vote_scores(_features(model, images), memory.cpu(), memory_labels.cpu(), num_classes, k, temperature)
    model.train(was_training)
    return scores


def _write_knn_memory(model: nn.Module, card: ModelCard, train_feats: torch.Tensor, train_y: torch.Tensor,
                      test_x: torch.Tensor, test_y: torch.Tensor, cfg: TrainConfig) -> dict[str, Any]:
    """Write the card's AdaNPC source memory and measure the card's clean accuracy with the vote
    (AdaNPC's default k and temperature, the shipped memory, no test entries added)."""
    from tta.adapters.adanpc import MEMORY_SUFFIX, AdaNPCConfig, save_memory

    rows = len(train_y) if cfg.memory_rows is None else min(cfg.memory_rows, len(train_y))
    dtype = torch.float16 if cfg.memory_dtype == "float16" else torch.float32
    feats = F.normalize(train_feats[:rows], dim=1).to(dtype)
    labels = train_y[:rows].to(torch.int64)
    assert card.path is not None
    path = save_memory(card.path.with_name(f"{card.name}{MEMORY_SUFFIX}"), feats, labels, card.num_classes, {
        "card": card.name, "dataset": str(card.dataset), "split": "train", "rows": str(rows),
        "checkpoint_sha256": str(card.sha256), "dtype": cfg.memory_dtype,
    })
    adanpc = AdaNPCConfig()
    scores = _knn_predict(model, test_x, F.normalize(feats.float(), dim=1), labels, card.num_classes, adanpc.k,
                          adanpc.temperature)
    correct = int((scores.argmax(1) == test_y).sum())
    acc = round(100.0 * correct / len(test_y), 2)
    print(f"wrote {path} ({rows} rows, {cfg.memory_dtype}): clean accuracy of the kNN vote (k {adanpc.k}, "
          f"tau {adanpc.temperature}) {acc}% ({correct}/{len(test_y)})", flush=True)
    return {"memory": path.name, "memory_rows": rows, "memory_dtype": cfg.memory_dtype,
            "clean_accuracy_knn_vote": acc, "clean_correct_knn_vote": correct,
            "vote": f"k {adanpc.k}, temperature {adanpc.temperature}",
            "clean_accuracy_linear_probe": card.clean_accuracy}
