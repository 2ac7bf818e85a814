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


def test_evicted_state_mode_equals_saved_state_mode(tmp_path, umask_022):
    """A state evicted to a FolderStateStore is written by the same writer as `Adapter.save`."""
    from tta.engine.store import FolderStateStore

    store = FolderStateStore(tmp_path / "store")
    store.write("stream-1", b"state bytes")
    assert _mode(tmp_path / "store" / "stream-1.state") == 0o644
    assert store.read("stream-1") == b"state bytes"
    os.umask(0o077)
    store.write("stream-2", b"private")
    assert _mode(tmp_path / "store" / "stream-2.state") == 0o600


def test_durable_writer_removes_dead_writers_temporaries_and_keeps_the_old_file(tmp_path):
    from tta.fileio import write_durable

    target = tmp_path / "k.state"
    write_durable(target, b"old")
    dead = tmp_path / ".k.state.999999999.abcd1234.tmp"  # pid that cannot exist on Linux (> pid_max)
    dead.write_bytes(b"half")

    def failing(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_durable(target, failing)
    assert target.read_bytes() == b"old"  # the failed write left the old content in place
    assert not dead.exists()  # the dead writer's temporary was removed
    assert [p.name for p in tmp_path.iterdir()] == ["k.state"]  # and the failed one's too
