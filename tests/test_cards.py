"""Model cards: YAML round trip, validation, the shipped reference cards and `tta train-source`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tta.errors import DataNotFoundError
from tta.models import DEFAULT_CARD, VIT_CARD, ModelCard, card_entries, get_card, list_cards, load, sha256_file
from tta.models.training import evaluate, to_tensor_uint8

SHIPPED = [DEFAULT_CARD, VIT_CARD, "resnet20-fmnist-knn"]


def _card(tmp_path: Path) -> ModelCard:
    return ModelCard(name="demo", arch="resnet20", num_classes=10, checkpoint="demo.safetensors", sha256="ab" * 32,
                     input_size=(3, 32, 32), mean=(0.2, 0.2, 0.2), std=(0.3, 0.3, 0.3), arch_kwargs={"width": 8},
                     clean_accuracy=93.5, clean_correct=9350, num_test=10000, cotta_threshold=0.71,
                     training={"epochs": 1}, command="tta train-source --epochs 1")


def test_card_yaml_round_trip(tmp_path: Path) -> None:
    card = _card(tmp_path)
    path = card.save(tmp_path / "demo.yaml")
    data = yaml.safe_load(path.read_text())
    assert data["normalization"] == {"inside_model": True, "mean": [0.2, 0.2, 0.2], "std": [0.3, 0.3, 0.3]}
    again = get_card(path)
    assert again == card
    assert again.in_chans == 3
    assert again.checkpoint_path() == tmp_path / "demo.safetensors"


def test_card_validation_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "arch": "resnet20", "num_classes": 10, "checkpoint": "x.pt", "colour": "red"}))
    with pytest.raises(DataNotFoundError, match=r"broken\.yaml: unknown field\(s\) \['colour'\]"):
        get_card(path)
    path.write_text(yaml.safe_dump({"name": "x", "arch": "resnet20"}))
    with pytest.raises(DataNotFoundError, match=r"broken\.yaml: missing required field\(s\) \['num_classes', 'checkpoint'\]"):
        get_card(path)
    path.write_text("a: [")
    with pytest.raises(DataNotFoundError, match="not valid YAML"):
        get_card(path)
    path.write_text(yaml.safe_dump({"name": "x", "arch": "resnet20", "num_classes": 10, "checkpoint": "x.pt",
                                    "normalization": {"mean": [0.5]}}))
    with pytest.raises(DataNotFoundError, match="mean and std"):
        get_card(path)


def test_card_guard_settings_are_checked_and_kept(tmp_path: Path) -> None:
    card = _card(tmp_path)
    card.guard = {"probe_every": 1, "window": 4}
    again = get_card(card.save(tmp_path / "demo.yaml"))
    assert again.guard == {"probe_every": 1, "window": 4} and again == card
    card.guard = {"preset": "strict", "confident": 0.8}  # a preset, then keys over it, kept as written
    assert get_card(card.save(tmp_path / "strict.yaml")).guard == {"preset": "strict", "confident": 0.8}
    path = tmp_path / "broken.yaml"
    base = {"name": "x", "arch": "resnet20", "num_classes": 10, "checkpoint": "x.pt"}
    for guard, message in (({"speed": 3}, r"broken\.yaml: unknown guard setting\(s\) \['speed'\]; valid: preset, probe_every"),
                           ({"preset": "paranoid"}, r"broken\.yaml: unknown guard preset 'paranoid'; valid: default, strict"),
                           ({"window": 0}, r"broken\.yaml: guard window must be an integer >= 1"),
                           ([1, 2], r"broken\.yaml.*guard")):
        path.write_text(yaml.safe_dump({**base, "guard": guard}))
        with pytest.raises(DataNotFoundError, match=message):
            get_card(path)


def test_unknown_card_and_missing_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataNotFoundError, match="unknown model card 'no-such-card'.*available:"):
        get_card("no-such-card")
    with pytest.raises(DataNotFoundError, match="does not exist"):
        get_card(tmp_path / "absent.yaml")
    monkeypatch.setenv("TTA_MODELS_DIR", str(tmp_path))
    _card(tmp_path).save(tmp_path / "demo.yaml")
    assert card_entries()["demo"].origin == "$TTA_MODELS_DIR" and DEFAULT_CARD in list_cards()
    with pytest.raises(DataNotFoundError, match=r"demo\.safetensors does not exist"):
        load("demo")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_card_is_complete(name: str) -> None:
    card = get_card(name)
    assert card.name == name and name in list_cards()
    ckpt = card.checkpoint_path()
    assert ckpt.suffix == ".safetensors" and ckpt.stat().st_size < 5 * 2**20
    assert sha256_file(ckpt) == card.sha256
    assert card.input_size == (3, 32, 32) and card.num_classes == 10 and card.mean is not None
    assert card.command.startswith("tta train-source --dataset fashion-mnist")
    assert card.training["train_time_s"] > 0 and card.training["train_images"] == 60000
    assert 0.0 < card.cotta_threshold < 1.0
    assert card.num_test == 10000 and card.clean_accuracy == round(100 * card.clean_correct / card.num_test, 2)
    assert card.clean_accuracy >= (92.0 if name == DEFAULT_CARD else 80.0)


@pytest.fixture(scope="module")
def fmnist_test() -> tuple[torch.Tensor, torch.Tensor]:
    from tta.streams.fashion_mnist import load_fashion_mnist

    images, labels = load_fashion_mnist("test")
    return to_tensor_uint8(images), torch.from_numpy(labels)


@pytest.mark.data
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_card_reproduces_clean_accuracy(name: str, fmnist_test: tuple[torch.Tensor, torch.Tensor]) -> None:
    card = get_card(name)
    model = load(name)
    assert not model.training
    images, labels = fmnist_test
    with torch.inference_mode():
        correct = evaluate(model, images, labels)
    assert correct == card.clean_correct, f"{name}: {correct / 100:.2f}% vs card {card.clean_accuracy}%"


@pytest.mark.data
def test_train_source_cli_writes_a_loadable_card(tmp_path: Path) -> None:
    from tta.cli import main

    out = tmp_path / "tiny"
    argv = ["train-source", "--epochs", "1", "--out", str(out), "--arch-kwargs", '{"width": 4}', "--batch-size", "64",
            "--limit-train", "256", "--limit-test", "200", "--seed", "3", "--no-progress"]
    assert main(argv) == 0
    card = get_card(out.with_suffix(".yaml"))
    assert card.name == "tiny" and card.arch_kwargs == {"width": 4} and card.num_test == 200
    assert card.sha256 == sha256_file(out.with_suffix(".safetensors"))
    assert card.command == (f"tta train-source --dataset fashion-mnist --arch resnet20 --epochs 1 --out {out} --seed 3 "
                            "--batch-size 64 --limit-train 256 --limit-test 200 --arch-kwargs '{\"width\":4}'")
    assert 0.0 < card.cotta_threshold < 1.0 and card.training["train_images"] == 256
    from tta.streams.fashion_mnist import load_fashion_mnist

    images, labels = load_fashion_mnist("test")
    correct = evaluate(load(card), to_tensor_uint8(images[:200]), torch.from_numpy(labels[:200]))
    assert correct == card.clean_correct
