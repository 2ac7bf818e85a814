"""Saved states, exports and result files get open()'s permissions (0666 minus the umask), not 0600."""

from __future__ import annotations

import os
import stat

import pytest
import torch

import tta
from engine_helpers import tiny_cnn
from tta.fileio import current_umask, default_file_mode


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_default_mode_follows_the_umask(umask_022):
    assert current_umask() == 0o022 and default_file_mode() == 0o644
    os.umask(0o077)
    assert default_file_mode() == 0o600


def test_saved_state_mode(tmp_path, umask_022):
    adapter = tta.adapt(tiny_cnn(), "tent")
    adapter(torch.rand(8, 3, 16, 16))
    adapter.save(tmp_path / "state.pt")
    assert _mode(tmp_path / "state.pt") == 0o644


def test_export_mode(tmp_path, umask_022):
    from tta.export import export_onnx

    export_onnx(tiny_cnn(), tmp_path / "m.onnx", input_size=(3, 16, 16), verify=False)
    assert _mode(tmp_path / "m.onnx") == 0o644
