"""`tta make-c`: CIFAR-10-C layout, resumable, atomic, seeded."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from tta.errors import ConfigError, DataNotFoundError
from tta.streams import corruptions as C
from tta.streams import generate
from tta.streams.datasets import CorruptionArraySet


@pytest.fixture
def small():
    rng = np.random.default_rng(0)
    images = (rng.random((12, 32, 32, 3)) * 255).astype(np.uint8)
    labels = rng.integers(0, 10, 12)
    return images, labels


def test_layout_matches_cifar10_c_and_loads_back(tmp_path, small):
    images, labels = small
    status = generate.make_c(images, labels, tmp_path, corruptions=("fog", "contrast"), seed=3, progress=False)
    assert status == {"fog": "written", "contrast": "written"}
    fog = np.load(tmp_path / "fog.npy")
    assert fog.shape == (60, 32, 32, 3) and fog.dtype == np.uint8
    lab = np.load(tmp_path / "labels.npy")
    assert lab.dtype == np.uint8 and np.array_equal(lab, np.tile(labels, 5))
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["severities"] == [1, 2, 3, 4, 5] and meta["n"] == 12 and meta["seed"] == 3
    for s in range(1, 6):  # severity blocks stacked in order, each the seeded corruption of the clean set
        seed = np.random.SeedSequence(3, spawn_key=(C.CORRUPTIONS.index("fog"), s, 0))
        np.testing.assert_array_equal(fog[(s - 1) * 12 : s * 12], C.corrupt(images, "fog", s, seed=seed))
    data = CorruptionArraySet(tmp_path)
    np.testing.assert_array_equal(data.domain("contrast", 5).images(np.arange(12)), np.load(tmp_path / "contrast.npy")[48:])
    assert not list(tmp_path.glob("*.tmp"))


def test_interrupted_run_leaves_no_partial_file_and_resumes(tmp_path, small, monkeypatch):
    images, labels = small
    real = generate.corrupt
    calls = []

    def interrupt_on_contrast(x, name, severity, seed=None):
        calls.append(name)
        if name == "contrast" and severity == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the second file
        return real(x, name, severity, seed=seed)

    monkeypatch.setattr(generate, "corrupt", interrupt_on_contrast)
    with pytest.raises(KeyboardInterrupt):
        generate.make_c(images, labels, tmp_path, corruptions=("fog", "contrast", "snow"), progress=False)
    assert (tmp_path / "fog.npy").is_file() and np.load(tmp_path / "fog.npy").shape == (60, 32, 32, 3)
    assert not (tmp_path / "contrast.npy").exists() and not (tmp_path / "snow.npy").exists()
    assert not list(tmp_path.glob("*.tmp"))
    fog_before = (tmp_path / "fog.npy").read_bytes()

    # a stale temp file from a hard kill is simply overwritten
    (tmp_path / "contrast.npy.tmp").write_bytes(b"half")
    calls.clear()
    monkeypatch.setattr(generate, "corrupt", lambda x, n, s, seed=None: (calls.append(n), real(x, n, s, seed=seed))[1])
    status = generate.make_c(images, labels, tmp_path, corruptions=("fog", "contrast", "snow"), progress=False)
    assert status == {"fog": "kept", "contrast": "written", "snow": "written"}
    assert "fog" not in calls and (tmp_path / "fog.npy").read_bytes() == fog_before
    assert not list(tmp_path.glob("*.tmp"))

    # a truncated final file (e.g. copied in by hand) is detected and regenerated
    (tmp_path / "snow.npy").write_bytes((tmp_path / "snow.npy").read_bytes()[:1000])
    status = generate.make_c(images, labels, tmp_path, corruptions=("fog", "contrast", "snow"), progress=False)
    assert status["snow"] == "written" and np.load(tmp_path / "snow.npy").shape == (60, 32, 32, 3)


def test_resume_is_deterministic_and_matches_one_shot(tmp_path, small):
    images, labels = small
    generate.make_c(images, labels, tmp_path / "a", corruptions=("shot_noise", "frost"), seed=1, progress=False)
    generate.make_c(images, labels, tmp_path / "b", corruptions=("frost",), seed=1, progress=False)
    generate.make_c(images, labels, tmp_path / "b", corruptions=("shot_noise", "frost"), seed=1, progress=False)
    for c in ("shot_noise", "frost"):
        assert (tmp_path / "a" / f"{c}.npy").read_bytes() == (tmp_path / "b" / f"{c}.npy").read_bytes()


def test_severity_subset_is_recorded_and_mismatches_refused(tmp_path, small):
    images, labels = small
    generate.make_c(images, labels, tmp_path, corruptions=("fog",), severities=(5,), progress=False)
    data = CorruptionArraySet(tmp_path)
    assert data.severities == (5,) and np.load(tmp_path / "fog.npy").shape == (12, 32, 32, 3)
    with pytest.raises(ConfigError, match="already holds a set made with"):  # fog would keep severity 5 only
        generate.make_c(images, labels, tmp_path, corruptions=("snow",), severities=(1, 5), progress=False)
    with pytest.raises(ConfigError, match="unknown corruptions"):
        generate.make_c(images, labels, tmp_path / "x", corruptions=("rain",), progress=False)
    (tmp_path / "other").mkdir()
    np.save(tmp_path / "other" / "fog.npy", np.zeros(3))
    with pytest.raises(ConfigError, match="not a set made by make-c"):
        generate.make_c(images, labels, tmp_path / "other", corruptions=("fog",), progress=False)


def test_cli_parser_and_severity_syntax():
    from tta.cli import make_c

    assert make_c.parse_severities("1-5") == [1, 2, 3, 4, 5]
    assert make_c.parse_severities("5") == [5]
    assert make_c.parse_severities("2-3,5") == [2, 3, 5]
    for bad in ("0-2", "x", "6"):
        with pytest.raises(ConfigError):
            make_c.parse_severities(bad)
    parser = argparse.ArgumentParser()
    make_c.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["make-c", "--dataset", "fashion-mnist", "--out", "x", "--limit", "5"])
    assert args.func is make_c.run and args.limit == 5 and args.severities == "1-5" and args.seed == 0


def test_cli_generates_fashion_mnist_c(tmp_path, capsys):
    from tta.cli import SUBCOMMANDS, make_c

    assert "make_c" in SUBCOMMANDS  # `tta make-c` is wired into the CLI main
    parser = argparse.ArgumentParser()
    make_c.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "fmc"
    argv = ["make-c", "--dataset", "fashion-mnist", "--out", str(out), "--limit", "16", "--severities", "5",
            "--corruptions", "contrast,fog", "--seed", "2", "--no-progress"]
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except DataNotFoundError as exc:  # pragma: no cover - dataset installed here
        pytest.skip(str(exc))
    assert code == 0
    assert "2 corruptions written, 0 kept" in capsys.readouterr().out
    assert np.load(out / "fog.npy").shape == (16, 32, 32, 3)
    assert args.func(args) == 0 and "0 corruptions written, 2 kept" in capsys.readouterr().out
    args = parser.parse_args(["make-c", "--dataset", "fashion-mnist", "--out", str(out), "--corruptions", "rain"])
    with pytest.raises(ConfigError, match=r"unknown \['rain'\]"):
        args.func(args)


def test_cli_generates_a_set_from_an_image_folder(tmp_path, capsys):
    from PIL import Image

    from tta.cli import make_c

    rng = np.random.default_rng(0)
    for k, cls in enumerate(("ants", "bees")):
        (tmp_path / "src" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray((rng.random((24, 24, 3)) * 255).astype(np.uint8)).save(tmp_path / "src" / cls / f"{i}.png")
    parser = argparse.ArgumentParser()
    make_c.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["make-c", "--dataset", "image-folder", "--source", str(tmp_path / "src"), "--out",
                              str(tmp_path / "out"), "--severities", "1,5", "--corruptions", "pixelate", "--no-progress"])
    assert args.func(args) == 0
    data = CorruptionArraySet(tmp_path / "out")
    assert data.severities == (1, 5) and data.n == 6
    np.testing.assert_array_equal(data.domain("pixelate", 5).labels, [0, 0, 0, 1, 1, 1])
    assert data.domain("pixelate", 1).images(np.arange(6)).shape == (6, 24, 24, 3)
    args = parser.parse_args(["make-c", "--dataset", "image-folder", "--out", str(tmp_path / "x")])
    with pytest.raises(ConfigError, match="needs --source"):
        args.func(args)


def test_more_severities_for_every_corruption_extend_the_set(tmp_path, small):
    """Severity 5 only (what `make demo` writes), then 1-5 for every corruption of the folder (the gradual
    setting): the set is regenerated with the same severity-5 data; a partial request is still refused."""
    images, labels = small
    generate.make_c(images, labels, tmp_path, corruptions=("fog", "snow"), severities=(5,), progress=False)
    sev5 = np.load(tmp_path / "fog.npy")
    with pytest.raises(ConfigError, match="already holds a set made with"):
        generate.make_c(images, labels, tmp_path, corruptions=("fog",), severities=(1, 2, 3, 4, 5), progress=False)
    status = generate.make_c(images, labels, tmp_path, corruptions=("fog", "snow"), severities=(1, 2, 3, 4, 5),
                             progress=False)
    assert status == {"fog": "written", "snow": "written"}
    data = CorruptionArraySet(tmp_path)
    assert data.severities == (1, 2, 3, 4, 5) and np.array_equal(np.load(tmp_path / "fog.npy")[4 * 12:], sev5)
    assert len(np.load(tmp_path / "labels.npy")) == 5 * 12


def test_subset_request_on_a_complete_superset_keeps_it(tmp_path, small):
    images, labels = small
    generate.make_c(images, labels, tmp_path, corruptions=("fog", "snow"), severities=(1, 3, 5), progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    status = generate.make_c(images, labels, tmp_path, corruptions=("fog",), severities=(5,), progress=False)
    assert status == {"fog": "kept"}
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
    data = CorruptionArraySet(tmp_path)
    assert data.severities == (1, 3, 5)
    # a different seed is still refused
    with pytest.raises(ConfigError, match="already holds a set made with"):
        generate.make_c(images, labels, tmp_path, corruptions=("fog",), severities=(5,), seed=1, progress=False)
