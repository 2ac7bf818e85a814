"""Fashion-MNIST from its official idx `.gz` files, converted to 32x32 RGB uint8 (NHWC).

Default location: the Debian package `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist);
override with the `data_dir` argument or the environment variable ``TTA_FASHION_MNIST_DIR``.
The 28x28 images are zero-padded by 2 pixels on each side (no resampling) and the grey channel is
repeated three times, so the CIFAR pipeline and the CIFAR-10-C corruption constants apply.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from tta.errors import DataNotFoundError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "TTA_FASHION_MNIST_DIR"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}
HOW_TO_GET = (
    "install the Debian package with `apt-get update && apt-get install -y dataset-fashion-mnist`, "
    f"or set {ENV_VAR} to a folder holding the four official idx .gz files"
)


def default_dir() -> Path:
    return Path(os.environ.get(ENV_VAR, DEBIAN_DIR))


def _read_idx(path: Path, expected_dims: int) -> np.ndarray:
    if not path.is_file():
        raise DataNotFoundError(f"missing Fashion-MNIST file {path}; {HOW_TO_GET}")
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DataNotFoundError(f"{path} is not a readable gzip idx file ({exc}); {HOW_TO_GET}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataNotFoundError(f"{path} is not an idx file of unsigned bytes (bad magic number)")
    ndim = data[3]
    if ndim != expected_dims:
        raise DataNotFoundError(f"{path}: expected {expected_dims} dimensions, the header says {ndim}")
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise DataNotFoundError(f"{path}: header promises {expected} bytes of data, found {len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(tuple(dims))


def to_rgb32(images: np.ndarray) -> np.ndarray:
    """(N, 28, 28) uint8 -> (N, 32, 32, 3) uint8: zero-pad 2 px per side, repeat the channel."""
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    return np.repeat(padded[..., None], 3, axis=-1)


def load_fashion_mnist(split: str = "test", data_dir: str | os.PathLike[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 (N, 32, 32, 3), labels int64 (N,)) of the `train` or `test` split."""
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(data_dir) if data_dir is not None else default_dir()
    img_name, lbl_name, n = FILES[split]
    images = _read_idx(root / img_name, 3)
    labels = _read_idx(root / lbl_name, 1)
    if images.shape != (n, 28, 28) or labels.shape != (n,):
        raise DataNotFoundError(
            f"{root}: unexpected Fashion-MNIST {split} shapes {images.shape} / {labels.shape}, expected ({n}, 28, 28) / ({n},)"
        )
    if labels.max() > 9:
        raise DataNotFoundError(f"{root / lbl_name}: labels outside 0..9")
    return to_rgb32(images), labels.astype(np.int64)
