"""Labelled source (training) data of a model card's dataset: what source-based artefacts and
methods are built from (AdaNPC's memory, EATA's Fisher, RMT's prototypes, replay and warm-up)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from tta.errors import DataNotFoundError

if TYPE_CHECKING:
    import torch

FASHION_MNIST_NAMES = ("fashion-mnist", "fmnist", "fashion_mnist")


def source_split(dataset: str | None, data_dir: str | os.PathLike[str] | None = None) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(uint8 NCHW images, int64 labels) of `dataset`'s training split."""
    import torch

    if dataset in FASHION_MNIST_NAMES:
        from tta.streams.fashion_mnist import load_fashion_mnist

        images, labels = load_fashion_mnist("train", data_dir)
        return torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), torch.from_numpy(labels)
    raise DataNotFoundError(
        f"no training-split loader for dataset {dataset!r} (available: fashion-mnist); pass the source "
        "images and labels as tensors to the function that needs them"
    )


__all__ = ["FASHION_MNIST_NAMES", "source_split"]
