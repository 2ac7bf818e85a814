"""Plugins: a throwaway plugin distribution installed with pip, its adapter and model builder used by `tta run`.

The distribution declares a `tta.adapters` entry point (an undecorated Tent subclass, registered under
the entry point's name), a broken one, and a `tta.models` builder; a card names the builder by entry
point and by import path; a plain module registers an adapter with `tta.register_adapter` through
`--plugin`. Everything runs in subprocesses so the plugin's entry points are read from the installed
metadata, as for a user.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

PYPROJECT = """
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "tta-conf-ent-plugin"
version = "0.0.1"

[project.entry-points."tta.adapters"]
conf-ent = "conf_ent_plugin.adapters:ConfidentEntropy"
broken-ent = "conf_ent_plugin.missing:Nope"

[project.entry-points."tta.models"]
tiny-cnn = "conf_ent_plugin.nets:tiny_cnn"
"""

ADAPTERS = '''
"""Entropy minimisation on the confident samples only: a TENT variant shipped as a plugin."""
import math
from dataclasses import dataclass

from tta.adapters.tent import Tent, TentConfig, softmax_entropy


@dataclass
class ConfEntConfig(TentConfig):
    margin: float = 0.6  # samples with entropy below margin * log(classes) take part in the loss


class ConfidentEntropy(Tent):
    """Confident-sample entropy minimisation (a plugin adapter)."""

    Config = ConfEntConfig

    def loss(self, outputs, x):
        entropy = softmax_entropy(outputs)
        keep = (entropy < self.config.margin * math.log(outputs.shape[1])).float()
        return (entropy * keep).sum() / keep.sum().clamp_min(1.0)
'''

NETS = '''
from torch import nn


def tiny_cnn(num_classes=10, in_chans=3, width=8):
    return nn.Sequential(nn.Conv2d(in_chans, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
'''

LOCAL_PLUGIN = '''
import tta
from tta.adapters.tent import Tent


@tta.register_adapter("local-ent")
class LocalEntropy(Tent):
    """TENT registered by a module imported with --plugin."""
'''


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    """The plugin distribution pip-installed into a folder, a tiny data root and a card of the plugin's net."""
    from tta.models import ModelCard, save_state_dict
    from tta.streams.corruptions import STANDARD_ORDER

    root = tmp_path_factory.mktemp("plugin")
    src = root / "src"
    (src / "conf_ent_plugin").mkdir(parents=True)
    (src / "pyproject.toml").write_text(PYPROJECT)
    (src / "conf_ent_plugin" / "__init__.py").write_text("")
    (src / "conf_ent_plugin" / "adapters.py").write_text(ADAPTERS)
    (src / "conf_ent_plugin" / "nets.py").write_text(NETS)
    site = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(src)], check=True, capture_output=True, timeout=300)
    (root / "local").mkdir()
    (root / "local" / "local_plugin.py").write_text(LOCAL_PLUGIN)

    data = root / "data" / "fashion-mnist-c"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for c in STANDARD_ORDER:
        np.save(data / f"{c}.npy", rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8))
    np.save(data / "labels.npy", rng.integers(0, 10, 8))
    (data / "meta.json").write_text('{"severities": [5]}')

    sys.path.insert(0, str(site))
    try:
        from conf_ent_plugin.nets import tiny_cnn
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("conf_ent_plugin.nets", None), sys.modules.pop("conf_ent_plugin", None)
    cards = root / "cards"
    cards.mkdir()
    save_state_dict(tiny_cnn().state_dict(), cards / "tiny.safetensors")
    for name, arch in (("tiny-ep", "tiny-cnn"), ("tiny-path", "conf_ent_plugin.nets:tiny_cnn")):
        ModelCard(name=name, arch=arch, num_classes=10, checkpoint="tiny.safetensors",
                  dataset="fashion-mnist").save(cards / f"{name}.yaml")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(root / "local"), str(REPO)]),
           "TTA_DATA_DIR": str(root / "data"), "XDG_DATA_HOME": str(root / "xdg"), "HF_HUB_OFFLINE": "1"}
    return root, env


def tta_cli(env, *argv, cwd):
    return subprocess.run([sys.executable, "-c", "import sys; from tta.cli import main; sys.exit(main())", *argv],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture
def in_process(plugin_env, monkeypatch):
    """The plugin folders on sys.path of this process; plugin registrations undone afterwards."""
    import tta.plugins
    from tta.adapters import registry

    root, env = plugin_env
    for key in ("TTA_DATA_DIR", "XDG_DATA_HOME"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.syspath_prepend(str(root / "local"))
    monkeypatch.syspath_prepend(str(root / "site"))
    before = dict(registry._REGISTRY)
    monkeypatch.setattr(tta.plugins, "_adapter_plugins_loaded", False)
    monkeypatch.setattr(tta.plugins, "_broken_adapters", {})
    yield root
    registry._REGISTRY.clear()
    registry._REGISTRY.update(before)
    for name in [m for m in sys.modules if m.startswith(("conf_ent_plugin", "local_plugin"))]:
        del sys.modules[name]


def test_installed_plugin_runs_through_tta_run(plugin_env, tmp_path):
    """A fresh process: the entry points come from the installed metadata, as for a user."""
    root, env = plugin_env
    out = tmp_path / "out"
    r = tta_cli(env, "run", "--adapter", "conf-ent", "--model", str(root / "cards" / "tiny-ep.yaml"),
                "--limit", "8", "--batch-size", "4", "--set", "margin=0.9", "--no-progress", "--out", str(out),
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "fashion-mnist-c error % [fog5][#samples=8]:" in r.stdout
    meta = json.loads((out / "meta.json").read_text())
    assert meta["configs"]["conf-ent"]["margin"] == 0.9 and meta["runs"]["conf-ent"]["steps"] == 15 * 2


def test_card_naming_a_factory_by_import_path(in_process, tmp_path, capsys):
    from tta.cli import main

    assert main(["run", "--adapter", "conf-ent", "--model", str(in_process / "cards" / "tiny-path.yaml"),
                 "--limit", "4", "--no-progress"]) == 0
    assert "error % [jpeg_compression5][#samples=4]" in capsys.readouterr().out


def test_list_shows_plugins_without_importing_them(in_process, capsys):
    from tta.cli import main

    assert main(["list", "adapters"]) == 0
    out = capsys.readouterr().out
    assert "conf-ent" in out and "plugin tta-conf-ent-plugin 0.0.1" in out and "broken-ent" in out
    assert "conf_ent_plugin.adapters" not in sys.modules


def test_plugin_module_option(in_process, capsys):
    from tta.cli import main

    assert main(["run", "--adapter", "local-ent", "--limit", "4", "--no-progress"]) == 2
    assert "unknown adapter 'local-ent'" in capsys.readouterr().err
    assert main(["run", "--plugin", "local_plugin", "--adapter", "local-ent", "--limit", "4", "--no-progress"]) == 0


def test_broken_entry_point_is_one_line_exit_2(in_process, tmp_path, capsys):
    import tta
    from tta.cli import main

    assert main(["run", "--adapter", "broken-ent", "--limit", "4", "--no-progress", "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "adapter plugin entry point 'broken-ent' = 'conf_ent_plugin.missing:Nope' (tta-conf-ent-plugin 0.0.1) " \
           "failed to load: ModuleNotFoundError" in err
    # the working plugin of the same distribution is unaffected; the Python API warns about the broken one
    with pytest.warns(UserWarning, match="broken-ent"):
        assert "conf-ent" in tta.list_adapters()
