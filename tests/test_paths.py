"""`tta.paths`: search order of cards and specs, per-user folders, where card artefacts are read and written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tta import paths
from tta.models import get_card

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def user_home(tmp_path, monkeypatch):
    """A fresh per-user data folder and an empty working directory."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("TTA_MODELS_DIR", raising=False)
    monkeypatch.delenv("TTA_STREAMS_DIR", raising=False)
    monkeypatch.delenv("TTA_DATA_DIR", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return tmp_path / "xdg" / paths.APP_NAME


def test_user_folders_follow_platformdirs(user_home):
    assert paths.user_dir("models") == user_home / "models"
    assert paths.data_root() == user_home / "data"


def test_data_root_env(user_home, monkeypatch, tmp_path):
    monkeypatch.setenv("TTA_DATA_DIR", str(tmp_path / "d"))
    assert paths.data_root() == tmp_path / "d"


def test_search_order(user_home, monkeypatch, tmp_path):
    env = tmp_path / "env-models"
    monkeypatch.setenv("TTA_MODELS_DIR", str(env))
    origins = [d.origin for d in paths.search_dirs("models")]
    assert origins[:3] == ["$TTA_MODELS_DIR", "working directory", "user folder"]
    assert origins[3] in ("package", "source checkout")


def test_user_folder_adds_to_shipped_entries(user_home):
    (user_home / "models").mkdir(parents=True)
    (user_home / "models" / "mine.yaml").write_text("name: mine\n")
    entries = paths.list_entries("models", (".yaml",))
    assert entries["mine"].origin == "user folder"
    assert entries["resnet20-fmnist"].origin in ("package", "source checkout")


def test_earlier_folder_wins_a_name(user_home):
    cwd_models = Path.cwd() / "models"
    cwd_models.mkdir()
    (cwd_models / "resnet20-fmnist.yaml").write_text("name: x\n")
    assert paths.find_entry("models", "resnet20-fmnist", (".yaml",)).origin == "working directory"
    assert paths.find_entry("models", "../etc/passwd", (".yaml",)) is None


def test_shipped_card_artifacts_go_to_the_user_folder(user_home):
    card = get_card("resnet20-fmnist")
    out = card.artifact_output_path(".memory.safetensors")
    assert out == user_home / "models" / "resnet20-fmnist.memory.safetensors"
    # the shipped memory is found until the user writes their own, which then wins
    assert card.artifact_path(".memory.safetensors") == card.path.parent / "resnet20-fmnist.memory.safetensors"
    out.parent.mkdir(parents=True)
    out.write_bytes(b"x")
    assert card.artifact_path(".memory.safetensors") == out
    assert card.artifact_path(".nothing.safetensors") is None


def test_user_card_artifacts_go_beside_the_card(user_home, tmp_path):
    folder = tmp_path / "cards"
    folder.mkdir()
    text = (REPO / "models" / "resnet20-fmnist.yaml").read_text().replace(
        "checkpoint: resnet20-fmnist.safetensors", f"checkpoint: r20.safetensors")
    (folder / "r20.yaml").write_text(text.replace("name: resnet20-fmnist", "name: r20"))
    card = get_card(folder / "r20.yaml")
    assert card.artifact_output_path(".vida.safetensors") == folder / "r20.vida.safetensors"
    assert card.artifact_path(".vida.safetensors") is None
    (user_home / "models").mkdir(parents=True)
    (user_home / "models" / "r20.vida.safetensors").write_bytes(b"x")
    assert card.artifact_path(".vida.safetensors") == user_home / "models" / "r20.vida.safetensors"
    (folder / "r20.vida.safetensors").write_bytes(b"y")
    assert card.artifact_path(".vida.safetensors") == folder / "r20.vida.safetensors"


def test_read_only_card_folder_writes_to_user_folder(user_home, tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    assert paths.artifact_output_path("c", folder / "c.yaml", ".x") == folder / "c.x"
    real_access = os.access
    monkeypatch.setattr(paths.os, "access", lambda p, mode: False if Path(p) == folder else real_access(p, mode))
    assert paths.artifact_output_path("c", folder / "c.yaml", ".x") == user_home / "models" / "c.x"


@pytest.mark.parametrize("suffix", ["memory.safetensors", "./x", "/../x", ".a/b"])
def test_bad_artifact_suffix(suffix):
    from tta.errors import ConfigError

    with pytest.raises(ConfigError, match="suffix"):
        paths.artifact_name("c", suffix)
