"""Card artefact files (tta.models.artifacts): atomic write, format-checked read."""

import os
import stat

import pytest
import torch

from tta.errors import DataNotFoundError
from tta.fileio import default_file_mode
from tta.models.artifacts import read_artifact, write_artifact


def test_round_trip_keeps_tensors_and_metadata_as_strings(tmp_path):
    path = tmp_path / "sub" / "card.thing.safetensors"
    a = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # non-contiguous
    written = write_artifact(path, {"a": a, "b": torch.tensor([1, 2], dtype=torch.int64)}, "tta-thing-v1",
                             {"num_classes": 10})
    assert written == path
    tensors, meta = read_artifact(path, "tta-thing-v1", "thing", "tta build-thing")
    assert torch.equal(tensors["a"], a) and tensors["b"].tolist() == [1, 2]
    assert meta == {"format": "tta-thing-v1", "num_classes": "10"}
    assert stat.S_IMODE(os.stat(path).st_mode) == default_file_mode()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_missing_unreadable_and_foreign_files_are_refused(tmp_path):
    with pytest.raises(DataNotFoundError, match="no thing file at .*build one with `tta build-thing`"):
        read_artifact(tmp_path / "none.safetensors", "tta-thing-v1", "thing", "tta build-thing")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(DataNotFoundError, match="not a readable thing file"):
        read_artifact(tmp_path / "bad.safetensors", "tta-thing-v1", "thing", "tta build-thing")
    write_artifact(tmp_path / "other.safetensors", {"x": torch.zeros(2)}, "tta-other-v1")
    with pytest.raises(DataNotFoundError, match="format 'tta-other-v1'"):
        read_artifact(tmp_path / "other.safetensors", "tta-thing-v1", "thing", "tta build-thing")


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "card.thing.safetensors"
    write_artifact(path, {"x": torch.ones(3)}, "tta-thing-v1")
    with pytest.raises(Exception):
        write_artifact(path, {"x": "not a tensor"}, "tta-thing-v1")  # type: ignore[dict-item]
    tensors, _ = read_artifact(path, "tta-thing-v1", "thing", "tta build-thing")
    assert tensors["x"].tolist() == [1.0, 1.0, 1.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
