"""Bad input at the command line: one `tta <cmd>: error: ...` line on stderr, exit code 2, nothing written.

Covers the stream-spec and model-card type checks, --seed, --out, the checkpoint path confinement,
labels outside the dataset's classes, plugin modules and card factories that do not import, and
video sources that cannot be read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import tta
from tta.cli import main

SPEC = "dataset: fashion-mnist-c\ndata: fashion-mnist-c\n"


def _fails(argv: list[str], capsys, *, contains: str, out: Path | None = None) -> str:
    """Run `tta argv`; assert exit 2, one clean stderr line containing `contains`, `out` not created."""
    if out is not None:
        argv = [*argv, "--out", str(out)]
    assert main([*argv, "--no-progress"] if argv[0] in ("run", "bench") else argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"tta {argv[0]}: error: ") and contains in err, err
    if out is not None:
        assert not out.exists()
    return err


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    """A tiny Fashion-MNIST-C folder (3 images per corruption, severity 5) as the data root."""
    from tta.streams.corruptions import STANDARD_ORDER

    root = tmp_path / "data" / "fashion-mnist-c"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for c in STANDARD_ORDER:
        np.save(root / f"{c}.npy", rng.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8))
    np.save(root / "labels.npy", np.array([0, 1, 2]))
    (root / "meta.json").write_text('{"severities": [5]}')
    monkeypatch.setenv("TTA_DATA_DIR", str(tmp_path / "data"))
    return root


@pytest.mark.parametrize("extra, message", [
    ("batch_size: abc\n", "batch_size must be an integer >= 1, got 'abc'"),
    ("batch_size: 2.5\n", "batch_size must be an integer >= 1, got 2.5"),
    ("batch_size: 0\n", "batch_size must be an integer >= 1"),
    ("n_per_domain: -5\n", "n_per_domain must be null or an integer >= 1, got -5"),
    ("n_per_domain: 0\n", "n_per_domain must be null or an integer >= 1, got 0"),
    ("severities: 5\n", "severities must be a list"),
    ("severities: [five]\n", "each severity must be an integer"),
    ("seed: -3\n", "seed must be an integer >= 0"),
    ("corruptions: fog\n", "corruptions must be 'standard' or a list"),
    ("first_from_5: 3\n", "first_from_5 must be true or false"),
    ("setting: 7\n", "setting must be a string"),
    ("1: x\n", "unknown spec keys ['1']"),
])
def test_spec_type_errors(tmp_path, capsys, extra, message):
    spec = tmp_path / "bad.yaml"
    spec.write_text(SPEC + extra)
    _fails(["run", "--adapter", "bn", "--stream", str(spec)], capsys, contains=message, out=tmp_path / "out")


def test_labels_outside_the_datasets_classes(data_root, tmp_path, capsys):
    np.save(data_root / "labels.npy", np.array([0, 1, 10]))
    _fails(["run", "--adapter", "bn"], capsys, contains="labels must lie in [0, 10), found 0..10", out=tmp_path / "o")
    np.save(data_root / "labels.npy", np.array([-1, 1, 2]))
    _fails(["run", "--adapter", "bn"], capsys, contains="labels must lie in [0, 10)", out=tmp_path / "o")


def _card(tmp_path: Path, **changes: object) -> Path:
    import shutil

    import yaml

    shipped = tta.models.get_card("resnet20-fmnist")
    data = yaml.safe_load(shipped.path.read_text())
    data.update(changes)
    shutil.copy(shipped.checkpoint_path(), tmp_path / "resnet20-fmnist.safetensors")
    path = tmp_path / "card.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"num_classes": "ten"}, "num_classes must be a positive integer, got 'ten'"),
    ({"num_classes": 0}, "num_classes must be a positive integer"),
    ({"arch": 5}, "arch must be a string"),
    ({"input_size": [3, 32]}, "input_size must be [C, H, W]"),
    ({"input_size": "32"}, "input_size must be [C, H, W]"),
    ({"sha256": "abc"}, "sha256 must be 64 hex digits"),
    ({"normalization": {"mean": [0.5], "std": ["x"]}}, "normalization needs mean and std"),
    ({"checkpoint": "/etc/passwd"}, "must be a file in the card's folder"),
    ({"checkpoint": "../elsewhere/w.safetensors"}, "must be a file in the card's folder"),
    ({"arch": "no_such_pkg.nets:factory"}, "cannot import module 'no_such_pkg.nets'"),
    ({"arch": "os.path:no_such_factory"}, "has no attribute 'no_such_factory'"),
    ({"arch": "collections:OrderedDict"}, "returned OrderedDict, not a torch.nn.Module"),
    ({"arch": "json:dumps"}, "failed: TypeError"),
])
def test_card_errors(data_root, tmp_path, capsys, changes, message):
    _fails(["run", "--adapter", "bn", "--model", str(_card(tmp_path, **changes))], capsys, contains=message,
           out=tmp_path / "out")


def test_seed_and_out_checked_before_the_run(data_root, tmp_path, capsys):
    _fails(["run", "--adapter", "bn", "--seed", "-1"], capsys, contains="--seed must be in 0..", out=tmp_path / "o")
    _fails(["run", "--adapter", "bn", "--seed", str(2**32)], capsys, contains="--seed must be in 0..")
    _fails(["run", "--adapter", "bn", "--device", "tpu"], capsys, contains="unknown device 'tpu'", out=tmp_path / "o")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _fails(["run", "--adapter", "bn", "--out", str(blocker / "sub")], capsys, contains="which is a file")
    _fails(["bench", "--adapters", "bn", "--out", str(blocker)], capsys, contains="is not a folder")
    assert blocker.read_text() == "x"


def test_missing_plugin_module(data_root, tmp_path, capsys):
    _fails(["run", "--adapter", "bn", "--plugin", "no_such_plugin_pkg"], capsys,
           contains="plugin module 'no_such_plugin_pkg' is not installed", out=tmp_path / "o")
    _fails(["run", "--adapter", "bn", "--plugin", "not a module"], capsys, contains="--plugin needs a module name")
    plugin = tmp_path / "raising_plugin.py"
    plugin.write_text("raise RuntimeError('plugin set-up failed')\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        _fails(["run", "--adapter", "bn", "--plugin", "raising_plugin"], capsys,
               contains="failed to import: RuntimeError: plugin set-up failed", out=tmp_path / "o")
    finally:
        sys.path.remove(str(tmp_path))


def test_unreadable_video_and_missing_camera(tmp_path, capsys):
    junk = tmp_path / "clip.mp4"
    junk.write_bytes(b"not a video" * 100)
    _fails(["run", "--adapter", "bn", "--video", str(junk)], capsys, contains="OpenCV cannot open video file",
           out=tmp_path / "o")
    _fails(["run", "--adapter", "bn", "--video", str(tmp_path / "absent.mp4")], capsys, contains="does not exist",
           out=tmp_path / "o")
    _fails(["run", "--adapter", "bn", "--camera", "57"], capsys, contains="OpenCV cannot open camera 57",
           out=tmp_path / "o")
    _fails(["run", "--adapter", "bn", "--camera", "-2"], capsys, contains="--camera must be a camera index")
    _fails(["run", "--adapter", "bn", "--video", str(junk), "--stream", "fmnist-c-continual"], capsys,
           contains="replace --stream")


@pytest.mark.parametrize("argv, message", [
    (["make-c", "--dataset", "fashion-mnist", "--out", "{file}", "--limit", "2"], "exists and is not a folder"),
    (["build-memory", "--model", "resnet20-fmnist", "--out", "{file}/m.safetensors"], "exists and is not a folder"),
    (["build-memory", "--model", "resnet20-fmnist", "--limit", "0"], "--limit must be >= 1, got 0"),
    (["build-memory", "--model", "resnet20-fmnist", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["warmup-adapters", "--model", "vit-fmnist", "--steps", "0"], "--steps must be >= 1, got 0"),
    (["warmup-adapters", "--model", "vit-fmnist", "--lr", "-1"], "--lr must be > 0"),
    (["warmup-adapters", "--model", "vit-fmnist", "--out", "{file}/w.safetensors"], "exists and is not a folder"),
    (["export", "onnx", "--out", "{file}/x.onnx", "--real-images", "0"], "exists and is not a folder"),
    (["export", "onnx", "--out", "{dir}", "--real-images", "0"], "is a folder, a file name is needed"),
    (["export", "onnx", "--model", "ghost", "--out", "{dir}/x.onnx"], "unknown model card 'ghost'"),
    (["train-source", "--out", "{file}/t", "--limit-train", "10"], "exists and is not a folder"),
    (["run", "--adapter", "bn", "--trim-heap-every", "-1"], "--trim-heap-every must be >= 0 (0 = never), got -1"),
    (["bench", "--adapters", "bn", "--trim-heap-every", "-3"], "--trim-heap-every must be >= 0 (0 = never), got -3"),
])
def test_output_paths_and_values_of_the_other_commands(tmp_path, capsys, argv, message):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    argv = [a.format(file=blocker, dir=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err
    assert blocker.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]
