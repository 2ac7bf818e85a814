"""Loaders of the standard corruption benchmarks, image folders and video.

Every loader hands out uint8 NHWC images through a `DomainData` (one domain = one corruption at one
severity): `len(d)`, `d.labels` (int64 or None) and `d.images(indices)`, read lazily (memory-mapped
`.npy` rows, or decoded JPEGs) so a stream holds only the batch it is about to yield.

Layouts:
- "-C" sets in the CIFAR-10-C layout (CIFAR-10-C, CIFAR-100-C, and every set `tta make-c` writes):
  ``<corruption>.npy`` uint8 (S*N, H, W, 3) with the severities stacked in order (severity block k
  is rows [k*N, (k+1)*N)), ``labels.npy`` (S*N,). S = 5 (severities 1..5) unless an optional
  ``meta.json`` names the severities present (``{"severities": [5], ...}``, written by make-c).
- ImageNet-C: ``<corruption>/<severity>/<wnid>/*.JPEG``; labels are the index of the wnid in the
  sorted list of wnid folders (the standard ImageNet class order when all 1000 are present) or in an
  explicit `classes` list; an optional image list (RobustBench's fixed 5,000 images) holds lines
  ``<wnid>/<file name>``.
- A plain image folder: ``<class>/*.{jpg,jpeg,png,bmp,webp}`` (labels = sorted class folders) or a
  flat folder of images (unlabeled).
- Video: any file OpenCV can decode, or a camera index, as an iterator of (C, H, W) float32 RGB frames.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from tta.errors import DataNotFoundError

CIFAR_C_LAYOUT = (
    "<corruption>.npy uint8 (5*N, H, W, 3) with severities 1..5 stacked (or the severities named in "
    "meta.json), and labels.npy of length 5*N"
)
IMAGENET_C_LAYOUT = "<corruption>/<severity 1..5>/<wnid>/*.JPEG"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
META_FILE = "meta.json"


class DomainData:
    """The images of one domain. Subclasses implement `__len__` and `images(indices)`."""

    labels: np.ndarray | None

    def __len__(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def images(self, indices: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        """uint8 (len(indices), H, W, 3) images at `indices`, in that order."""
        raise NotImplementedError


class ArrayDomain(DomainData):
    """Images in an array (in memory or a read-only memory map) and optional labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None) -> None:
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise DataNotFoundError(f"domain images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        if labels is not None and len(labels) != len(images):
            raise DataNotFoundError(f"{len(images)} images but {len(labels)} labels")
        self.array = images
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def images(self, indices: np.ndarray) -> np.ndarray:
        # sorted reads are sequential in a memory map; put them back in the requested order after
        order = np.argsort(indices, kind="stable")
        out = np.empty((len(indices),) + self.array.shape[1:], dtype=np.uint8)
        out[order] = self.array[np.asarray(indices)[order]]
        return out


class FileDomain(DomainData):
    """Images decoded from files on demand (PIL), optionally Resize(256) + CenterCrop(224)."""

    def __init__(self, paths: Sequence[Path], labels: np.ndarray | None, resize_crop: tuple[int, int] | None = None) -> None:
        self.paths = list(paths)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.resize_crop = resize_crop

    def __len__(self) -> int:
        return len(self.paths)

    def _read(self, path: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if self.resize_crop is not None:
                    im = _resize_center_crop(im, *self.resize_crop)
                return np.asarray(im, dtype=np.uint8)
        except FileNotFoundError as exc:
            raise DataNotFoundError(f"image file {path} is missing") from exc
        except (UnidentifiedImageError, OSError) as exc:
            raise DataNotFoundError(f"image file {path} is not a readable image ({exc})") from exc

    def images(self, indices: np.ndarray) -> np.ndarray:
        arrays = [self._read(self.paths[int(i)]) for i in indices]  # decoding is per file by nature
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise DataNotFoundError(
                f"images of different sizes {sorted(shapes)} in one batch; use resize_crop (e.g. (256, 224)) "
                f"to bring them to one size"
            )
        return np.stack(arrays) if arrays else np.empty((0, 0, 0, 3), dtype=np.uint8)


def _resize_center_crop(im, resize: int, crop: int):
    """torchvision Resize(resize) (shorter side, bilinear) + CenterCrop(crop), on a PIL image."""
    from PIL import Image

    w, h = im.size
    if w <= h:
        nw, nh = resize, int(resize * h / w)
    else:
        nw, nh = int(resize * w / h), resize
    im = im.resize((nw, nh), Image.BILINEAR)
    left = int(round((nw - crop) / 2.0))
    top = int(round((nh - crop) / 2.0))
    return im.crop((left, top, left + crop, top + crop))


# ----------------------------------------------------------------------------------------------
# "-C" sets in the CIFAR-10-C layout


def read_meta(root: Path) -> dict:
    path = root / META_FILE
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataNotFoundError(f"{path} is not valid JSON ({exc}); expected e.g. {{\"severities\": [1, 2, 3, 4, 5]}}") from exc
    if not isinstance(meta, dict):
        raise DataNotFoundError(f"{path} must hold a JSON object")
    return meta


class CorruptionArraySet:
    """A "-C" directory in the CIFAR-10-C layout (CIFAR-10-C, CIFAR-100-C, Fashion-MNIST-C...).

    `severities` are the ones stored (meta.json, default 1..5); `domain(corruption, severity)` returns
    the memory-mapped rows of that severity with their labels. With `num_classes`, every label must
    lie in [0, num_classes).
    """

    def __init__(self, root: str | os.PathLike[str], num_classes: int | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataNotFoundError(f"corruption set folder {self.root} does not exist; expected {CIFAR_C_LAYOUT}")
        meta = read_meta(self.root)
        sev = meta.get("severities", [1, 2, 3, 4, 5])
        if not isinstance(sev, list) or not sev or not all(isinstance(s, int) and 1 <= s <= 5 for s in sev):
            raise DataNotFoundError(f"{self.root / META_FILE}: 'severities' must be a list of integers in 1..5, got {sev!r}")
        self.severities: tuple[int, ...] = tuple(sev)
        labels_path = self.root / "labels.npy"
        if not labels_path.is_file():
            raise DataNotFoundError(f"missing {labels_path}; expected {CIFAR_C_LAYOUT}")
        labels = _load_npy(labels_path)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise DataNotFoundError(f"{labels_path}: expected a 1-D integer array, got {labels.dtype} {labels.shape}")
        if len(labels) % len(self.severities):
            raise DataNotFoundError(
                f"{labels_path}: length {len(labels)} is not a multiple of the {len(self.severities)} stored severities"
            )
        if num_classes is not None and len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise DataNotFoundError(
                f"{labels_path}: labels must lie in [0, {num_classes}), found {int(labels.min())}..{int(labels.max())}"
            )
        self.n = len(labels) // len(self.severities)
        self._labels = labels
        self.corruptions: tuple[str, ...] = tuple(
            sorted(p.stem for p in self.root.glob("*.npy") if p.name != "labels.npy")
        )

    def __repr__(self) -> str:
        return f"CorruptionArraySet({str(self.root)!r}, n={self.n}, severities={self.severities})"

    def array(self, corruption: str) -> np.ndarray:
        path = self.root / f"{corruption}.npy"
        if not path.is_file():
            raise DataNotFoundError(f"missing {path}; expected {CIFAR_C_LAYOUT}")
        arr = _load_npy(path)
        expected = len(self.severities) * self.n
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] != expected:
            raise DataNotFoundError(
                f"{path}: expected uint8 ({expected}, H, W, 3) for severities {list(self.severities)} x {self.n} "
                f"images, got {arr.dtype} {arr.shape}"
            )
        return arr

    def domain(self, corruption: str, severity: int) -> ArrayDomain:
        if severity not in self.severities:
            raise DataNotFoundError(
                f"{self.root} holds severities {list(self.severities)} only, severity {severity} was asked for"
            )
        k = self.severities.index(severity)
        rows = slice(k * self.n, (k + 1) * self.n)
        return ArrayDomain(self.array(corruption)[rows], self._labels[rows])


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataNotFoundError(f"{path} is not a readable .npy file ({exc})") from exc


# ----------------------------------------------------------------------------------------------
# ImageNet-C tree


def read_image_list(path: str | os.PathLike[str]) -> list[str]:
    """Lines ``<wnid>/<file name>`` (anything after whitespace is ignored); blank lines and # comments skipped."""
    p = Path(path)
    if not p.is_file():
        raise DataNotFoundError(f"image list {p} does not exist; expected one '<wnid>/<file name>' per line")
    entries = []
    for number, line in enumerate(p.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        rel = line.split()[0]
        if rel.count("/") != 1 or ".." in rel:
            raise DataNotFoundError(f"{p}:{number}: expected '<wnid>/<file name>', got {rel!r}")
        entries.append(rel)
    return entries


class ImageNetCSet:
    """ImageNet-C tree ``<corruption>/<severity>/<wnid>/*.JPEG``.

    classes: wnids in label order; default: the sorted wnid folders of each domain (the standard
        ImageNet order when all 1000 are present).
    image_list: optional fixed subset (RobustBench's 5,000 images): ``<wnid>/<file>`` lines.
    resize_crop: (256, 224) applies Resize(256) + CenterCrop(224) (the precomputed ImageNet-C JPEGs are
        already 224x224, so the default None reads them as they are).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        classes: Sequence[str] | None = None,
        image_list: str | os.PathLike[str] | Sequence[str] | None = None,
        resize_crop: tuple[int, int] | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataNotFoundError(f"ImageNet-C folder {self.root} does not exist; expected {IMAGENET_C_LAYOUT}")
        self.classes = list(classes) if classes is not None else None
        if isinstance(image_list, (str, os.PathLike)):
            image_list = read_image_list(image_list)
        self.image_list = list(image_list) if image_list is not None else None
        self.resize_crop = resize_crop
        self.corruptions = tuple(sorted(p.name for p in self.root.iterdir() if p.is_dir()))

    def domain(self, corruption: str, severity: int) -> FileDomain:
        folder = self.root / corruption / str(severity)
        if not folder.is_dir():
            raise DataNotFoundError(f"missing ImageNet-C folder {folder}; expected {IMAGENET_C_LAYOUT} under {self.root}")
        classes = self.classes or sorted(p.name for p in folder.iterdir() if p.is_dir())
        if not classes:
            raise DataNotFoundError(f"{folder} holds no <wnid> class folders; expected {IMAGENET_C_LAYOUT}")
        index = {wnid: i for i, wnid in enumerate(classes)}
        if self.image_list is not None:
            rels = self.image_list
        else:
            rels = [
                f"{wnid}/{f.name}"
                for wnid in classes
                if (folder / wnid).is_dir()
                for f in sorted((folder / wnid).iterdir())
                if f.suffix.lower() in IMAGE_EXTENSIONS
            ]
        paths, labels = [], []
        for rel in rels:
            wnid = rel.split("/", 1)[0]
            if wnid not in index:
                raise DataNotFoundError(f"{folder / rel}: class folder {wnid!r} is not one of the {len(classes)} classes")
            path = folder / rel
            if not path.is_file():
                raise DataNotFoundError(f"missing image {path} (listed in the image list); expected {IMAGENET_C_LAYOUT}")
            paths.append(path)
            labels.append(index[wnid])
        if not paths:
            raise DataNotFoundError(f"{folder} holds no images; expected {IMAGENET_C_LAYOUT}")
        return FileDomain(paths, np.asarray(labels, dtype=np.int64), self.resize_crop)


# ----------------------------------------------------------------------------------------------
# image folder and video


def image_folder(root: str | os.PathLike[str], resize_crop: tuple[int, int] | None = None) -> FileDomain:
    """A plain folder: ``<class>/*.jpg`` (labels = index of the sorted class folder) or flat images (no labels)."""
    base = Path(root)
    if not base.is_dir():
        raise DataNotFoundError(f"image folder {base} does not exist; expected <class>/*.jpg or a flat folder of images")
    classes = sorted(p.name for p in base.iterdir() if p.is_dir())
    if classes:
        paths, labels = [], []
        for i, name in enumerate(classes):
            files = sorted(f for f in (base / name).iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
            paths += files
            labels += [i] * len(files)
        domain = FileDomain(paths, np.asarray(labels, dtype=np.int64), resize_crop)
        domain.classes = classes
    else:
        paths = sorted(f for f in base.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
        domain = FileDomain(paths, None, resize_crop)
    if not paths:
        raise DataNotFoundError(f"image folder {base} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return domain


def open_capture(source: str | os.PathLike[str] | int):  # noqa: ANN201 - cv2.VideoCapture
    """An opened `cv2.VideoCapture` for a file or camera index, or `DataNotFoundError` (one line:
    OpenCV's own warnings about a missing camera are silenced)."""
    import cv2

    try:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    except AttributeError:  # OpenCV builds without the logging utilities
        pass
    cap = cv2.VideoCapture(source if isinstance(source, int) else str(source))
    if not cap.isOpened():
        cap.release()
        what = f"camera {source}" if isinstance(source, int) else f"video file {source}"
        raise DataNotFoundError(f"OpenCV cannot open {what}"
                                + (" (no such camera?)" if isinstance(source, int) else
                                   " (not a video, or a codec this OpenCV build lacks)"))
    return cap


def convert_frame(frame: np.ndarray, size: tuple[int, int] | None, channels: int) -> np.ndarray:
    """An OpenCV frame (BGR, or grey) as uint8 (H, W, channels) RGB/grey, resized (INTER_AREA) to `size`."""
    import cv2

    if frame.ndim == 2:
        frame = frame[:, :, None]
    if channels == 1 and frame.shape[2] != 1:
        frame = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)[:, :, None]
    elif channels == 3 and frame.shape[2] == 1:
        frame = np.repeat(frame, 3, axis=2)
    elif channels == 3:
        frame = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    if size is not None and frame.shape[:2] != tuple(size):
        frame = cv2.resize(frame, (size[1], size[0]), interpolation=cv2.INTER_AREA).reshape(size[0], size[1], -1)
    return frame


class VideoFrames:
    """Frames of a video file or camera (OpenCV) as (C, H, W) float32 tensors in [0, 1], RGB (or grey).

    source: a file path or a camera index. size: optional (height, width) every frame is resized to
    (INTER_AREA, as the edge video loop does). channels: 3 (RGB, default) or 1 (grey), a model card's
    ``in_chans``. max_frames: stop after this many frames; stride: keep every stride-th frame.
    Iterating opens the source anew (a file restarts from its first frame).
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | int,
        *,
        size: tuple[int, int] | None = None,
        channels: int = 3,
        max_frames: int | None = None,
        stride: int = 1,
    ) -> None:
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if isinstance(source, bool) or (isinstance(source, int) and source < 0):
            raise DataNotFoundError(f"camera index must be >= 0, got {source!r}")
        if not isinstance(source, int):
            source = Path(source)
            if not source.is_file():
                raise DataNotFoundError(f"video file {source} does not exist")
        self.source = source
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.channels = channels
        self.max_frames = max_frames
        self.stride = stride

    def probe(self) -> tuple[int, int, int]:
        """Open the source and decode one frame: its (H, W, channels) as delivered, or `DataNotFoundError`."""
        cap = open_capture(self.source)
        try:
            ok, frame = cap.read()
        finally:
            cap.release()
        if not ok or frame is None:
            raise DataNotFoundError(f"video source {self.source!r} delivered no decodable frames")
        return (frame.shape[0], frame.shape[1], 1 if frame.ndim == 2 else frame.shape[2])

    def __iter__(self) -> Iterator[torch.Tensor]:
        cap = open_capture(self.source)
        try:
            read = kept = 0
            while self.max_frames is None or kept < self.max_frames:
                ok, frame = cap.read()
                if not ok:
                    break
                read += 1
                if (read - 1) % self.stride:
                    continue
                converted = convert_frame(frame, self.size, self.channels)
                kept += 1
                yield torch.from_numpy(np.ascontiguousarray(converted.transpose(2, 0, 1))).float().div_(255)
            if read == 0:
                raise DataNotFoundError(f"video source {self.source!r} delivered no decodable frames")
        finally:
            cap.release()
