"""Loaders on fixtures written in the exact on-disk formats (CIFAR-10-C, ImageNet-C, folders, video)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from tta.errors import DataNotFoundError
from tta.streams.datasets import CorruptionArraySet, ImageNetCSet, VideoFrames, image_folder, read_image_list

N = 6


def coded_images(corruption: int, severity: int, n: int = N) -> np.ndarray:
    """Images whose pixels encode (corruption, severity, index) so every row can be identified."""
    img = np.zeros((n, 32, 32, 3), np.uint8)
    img[..., 0] = corruption * 10
    img[..., 1] = severity * 10
    img[..., 2] = np.arange(n)[:, None, None] * 10
    return img


def write_cifar_c(root: Path, corruptions=("fog", "contrast"), severities=(1, 2, 3, 4, 5), meta: bool = False) -> np.ndarray:
    root.mkdir(parents=True, exist_ok=True)
    labels = np.array([3, 1, 4, 1, 5, 9], np.uint8)
    np.save(root / "labels.npy", np.tile(labels, len(severities)))  # CIFAR-10-C: uint8, 5*N
    for ci, c in enumerate(corruptions):
        np.save(root / f"{c}.npy", np.concatenate([coded_images(ci, s) for s in severities]))
    if meta:
        (root / "meta.json").write_text(json.dumps({"severities": list(severities)}))
    return labels


def test_cifar_c_layout_gives_right_images_labels_severities_and_order(tmp_path):
    labels = write_cifar_c(tmp_path / "CIFAR-10-C")
    data = CorruptionArraySet(tmp_path / "CIFAR-10-C")
    assert data.severities == (1, 2, 3, 4, 5) and data.n == N and data.corruptions == ("contrast", "fog")
    for ci, c in enumerate(("fog", "contrast")):
        for s in range(1, 6):
            d = data.domain(c, s)
            assert len(d) == N
            np.testing.assert_array_equal(d.labels, labels)
            np.testing.assert_array_equal(d.images(np.arange(N)), coded_images(ci, s))
            order = np.array([4, 0, 5, 2])
            np.testing.assert_array_equal(d.images(order), coded_images(ci, s)[order])  # requested order kept


def test_meta_json_names_a_subset_of_severities(tmp_path):
    write_cifar_c(tmp_path, severities=(2, 5), meta=True)
    data = CorruptionArraySet(tmp_path)
    assert data.severities == (2, 5)
    np.testing.assert_array_equal(data.domain("fog", 5).images(np.arange(N)), coded_images(0, 5))
    with pytest.raises(DataNotFoundError, match="severities \\[2, 5\\] only"):
        data.domain("fog", 1)


def test_malformed_cifar_c_files_name_path_and_layout(tmp_path):
    with pytest.raises(DataNotFoundError, match="does not exist.*labels.npy"):
        CorruptionArraySet(tmp_path / "nope")
    write_cifar_c(tmp_path)
    np.save(tmp_path / "fog.npy", np.zeros((5 * N, 32, 32), np.uint8))  # grey: wrong rank
    data = CorruptionArraySet(tmp_path)
    with pytest.raises(DataNotFoundError, match=r"fog.npy: expected uint8 \(30, H, W, 3\)"):
        data.domain("fog", 1)
    with pytest.raises(DataNotFoundError, match="missing .*snow.npy"):
        data.domain("snow", 1)
    (tmp_path / "contrast.npy").write_bytes(b"not numpy")
    with pytest.raises(DataNotFoundError, match="contrast.npy is not a readable .npy"):
        data.domain("contrast", 1)
    (tmp_path / "labels.npy").unlink()
    with pytest.raises(DataNotFoundError, match="missing .*labels.npy.*<corruption>.npy"):
        CorruptionArraySet(tmp_path)


def write_imagenet_c(root: Path, corruptions=("fog", "snow"), severities=(5,), size=(40, 48)) -> dict:
    """Tiny ImageNet-C tree; each image a solid colour encoding (class, index)."""
    colours = {}
    for c in corruptions:
        for s in severities:
            for k, wnid in enumerate(("n01440764", "n01443537")):
                folder = root / c / str(s) / wnid
                folder.mkdir(parents=True)
                for i in range(2):
                    name = f"ILSVRC2012_val_0000{k}{i}.JPEG"
                    colour = (40 + 80 * k, 40 + 60 * i, 200)
                    Image.new("RGB", (size[1], size[0]), colour).save(folder / name, quality=95)
                    colours[f"{wnid}/{name}"] = colour
    return colours


def test_imagenet_c_tree_labels_order_and_image_list(tmp_path):
    colours = write_imagenet_c(tmp_path)
    data = ImageNetCSet(tmp_path)
    assert data.corruptions == ("fog", "snow")
    d = data.domain("fog", 5)
    assert len(d) == 4
    np.testing.assert_array_equal(d.labels, [0, 0, 1, 1])  # sorted wnids
    imgs = d.images(np.arange(4))
    assert imgs.shape == (4, 40, 48, 3) and imgs.dtype == np.uint8
    expected = [colours[f"{p.parent.name}/{p.name}"] for p in d.paths]
    np.testing.assert_allclose(imgs.reshape(4, -1, 3).mean(1), np.array(expected), atol=2)
    # the fixed image list decides the subset and its order
    listing = tmp_path / "list.txt"
    listing.write_text("# subset\nn01443537/ILSVRC2012_val_000010.JPEG\nn01440764/ILSVRC2012_val_000001.JPEG 0\n")
    assert read_image_list(listing) == ["n01443537/ILSVRC2012_val_000010.JPEG", "n01440764/ILSVRC2012_val_000001.JPEG"]
    d = ImageNetCSet(tmp_path, image_list=listing).domain("snow", 5)
    np.testing.assert_array_equal(d.labels, [1, 0])
    np.testing.assert_allclose(d.images(np.arange(2)).reshape(2, -1, 3).mean(1), [(120, 40, 200), (40, 100, 200)], atol=2)
    # Resize(256) + CenterCrop(224)
    d = ImageNetCSet(tmp_path, resize_crop=(256, 224)).domain("fog", 5)
    assert d.images(np.arange(2)).shape == (2, 224, 224, 3)


def test_imagenet_c_missing_pieces_are_named(tmp_path):
    write_imagenet_c(tmp_path)
    data = ImageNetCSet(tmp_path)
    with pytest.raises(DataNotFoundError, match=r"missing ImageNet-C folder .*fog/3.*<corruption>/<severity"):
        data.domain("fog", 3)
    listing = tmp_path / "list.txt"
    listing.write_text("n01440764/absent.JPEG\n")
    with pytest.raises(DataNotFoundError, match="missing image .*absent.JPEG"):
        ImageNetCSet(tmp_path, image_list=listing).domain("fog", 5)
    listing.write_text("../../etc/passwd\n")
    with pytest.raises(DataNotFoundError, match="expected '<wnid>/<file name>'"):
        read_image_list(listing)
    bad = tmp_path / "fog" / "5" / "n01440764" / "ILSVRC2012_val_000000.JPEG"
    bad.write_bytes(b"garbage")
    with pytest.raises(DataNotFoundError, match="not a readable image"):
        data.domain("fog", 5).images(np.arange(1))


def test_image_folder_with_classes_and_flat(tmp_path):
    for k, cls in enumerate(("cat", "dog")):
        (tmp_path / "labelled" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (32, 32), (k * 100, i * 50, 0)).save(tmp_path / "labelled" / cls / f"{i}.png")
    d = image_folder(tmp_path / "labelled")
    assert d.classes == ["cat", "dog"] and len(d) == 6
    np.testing.assert_array_equal(d.labels, [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(d.images(np.array([4]))[0, 0, 0], (100, 50, 0))  # png: lossless
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "flat" / "a.jpg")
    flat = image_folder(tmp_path / "flat")
    assert flat.labels is None and flat.images(np.arange(1)).shape == (1, 16, 16, 3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="holds no images"):
        image_folder(tmp_path / "empty")


def test_fashion_mnist_test_split_as_32px_rgb():
    from tta.streams.fashion_mnist import load_fashion_mnist

    try:
        x, y = load_fashion_mnist("test")
    except DataNotFoundError as exc:  # pragma: no cover
        pytest.skip(str(exc))
    assert x.shape == (10000, 32, 32, 3) and x.dtype == np.uint8 and y.shape == (10000,)
    assert (x[:, :2] == 0).all() and (x[..., 0] == x[..., 2]).all() and set(np.unique(y)) == set(range(10))


def write_video(path: Path, frames: int = 12, size=(48, 64)) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (size[1], size[0]))
    assert writer.isOpened()
    for i in range(frames):
        frame = np.zeros((*size, 3), np.uint8)
        frame[..., 2] = 20 * i  # BGR: red grows with the frame index
        frame[..., 0] = 200
        writer.write(frame)
    writer.release()


def test_video_frames_read_back(tmp_path):
    path = tmp_path / "clip.avi"
    write_video(path)
    frames = list(VideoFrames(path))
    assert len(frames) == 12
    assert all(f.shape == (3, 48, 64) and f.dtype == torch.float32 for f in frames)
    red = torch.stack([f[0].mean() for f in frames]) * 255
    blue = torch.stack([f[2].mean() for f in frames]) * 255
    torch.testing.assert_close(red, torch.arange(12.0) * 20, atol=4, rtol=0)  # BGR -> RGB
    assert (blue - 200).abs().max() < 4
    sub = list(VideoFrames(path, size=(32, 32), max_frames=3, stride=2))
    assert len(sub) == 3 and sub[0].shape == (3, 32, 32)
    assert abs(sub[1][0].mean().item() * 255 - 40) < 4  # frames 0, 2, 4
    with pytest.raises(DataNotFoundError, match="does not exist"):
        VideoFrames(tmp_path / "missing.avi")
    (tmp_path / "bad.avi").write_bytes(b"not a video")
    with pytest.raises(DataNotFoundError):
        list(VideoFrames(tmp_path / "bad.avi"))


def test_video_frames_stream_through_the_engine_frame_batcher(tmp_path):
    import tta
    from tta.engine import FrameBatcher

    path = tmp_path / "clip.avi"
    write_video(path, frames=10, size=(32, 32))
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 5),
    ).eval()
    adapter = tta.adapt(model, "bn")
    with FrameBatcher(adapter, batch_size=4, max_wait_ms=10_000, device="cpu") as fb:
        preds = list(fb.map(VideoFrames(path)))
    assert len(preds) == 10 and all(0 <= p < 5 for p in preds)
    assert fb.batch_sizes == [4, 4, 2]
