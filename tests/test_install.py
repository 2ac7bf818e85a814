"""The runtime as a user meets it: the wheel installed normally (not editable), used from an empty folder.

The wheel is built pure-Python (TTA_SKIP_EXT=1: the ops fall back to their torch references; the
compiled library changes nothing about packaging) from a copy of the source tree, installed with
`pip install --target`, and run with that folder first on the path and a fresh per-user folder:
`tta list` shows the shipped cards and specs, `tta make-c --limit 200` and `tta run --limit 200` work
from an empty directory, and nothing is written into the installed package. A second check imports
`tta.edge` and the CLI with torch made unimportable (what an `[edge]` install without torch sees).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def _source_copy(dest: Path) -> Path:
    """The files git would ship (tracked + untracked, not ignored) copied to `dest` (no stale build/)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("installed")
    src = _source_copy(root / "src")
    env = {**os.environ, "TTA_SKIP_EXT": "1"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src),
                    "-w", str(root / "wheel")], check=True, capture_output=True, env=env, timeout=600)
    wheel = next((root / "wheel").glob("tta_runtime-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(root / "site"),
                    str(wheel)], check=True, capture_output=True, timeout=600)
    empty = root / "empty"
    empty.mkdir()
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("TTA_")}
    run_env.update(PYTHONPATH=str(root / "site"), HOME=str(root / "home"), XDG_DATA_HOME=str(root / "home" / "share"),
                   XDG_CACHE_HOME=str(root / "home" / "cache"), HF_HUB_OFFLINE="1")
    return root, wheel, empty, run_env


def _tta(installed, *argv: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    root, _, empty, env = installed
    return subprocess.run([sys.executable, "-c", "import sys; from tta.cli import main; sys.exit(main())", *argv],
                          cwd=empty, env={**env, **(extra_env or {})}, capture_output=True, text=True, timeout=900)


def _written_into(site: Path, since: float) -> list[str]:
    return [str(p.relative_to(site)) for p in site.rglob("*")
            if p.is_file() and p.suffix != ".pyc" and p.stat().st_mtime > since]


def test_wheel_ships_cards_specs_and_metadata(installed):
    _, wheel, _, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    for name in ("tta/_data/models/resnet20-fmnist.yaml", "tta/_data/models/resnet20-fmnist.safetensors",
                 "tta/_data/models/resnet20-fmnist.memory.safetensors", "tta/_data/streams/fmnist-c-continual.yaml",
                 "tta/_data/streams/fmnist-ccc.calibration.json", "tta/py.typed", "tta/_build.json"):
        assert name in names
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Name: tta-runtime" in meta and "License-Expression: MIT" in meta
    assert "Requires-Dist: torch>=2.4; extra == \"torch\"" in meta and "Requires-Dist: onnxruntime; extra == \"edge\"" in meta
    assert not any(line.startswith("Requires-Dist: torch") and "extra" not in line for line in meta.splitlines())


def test_list_from_an_empty_folder(installed):
    root, _, empty, _ = installed
    r = _tta(installed, "list")
    assert r.returncode == 0, r.stderr
    assert "resnet20-fmnist [default]" in r.stdout and "fmnist-c-continual [default]" in r.stdout
    assert f"[package: {root / 'site' / 'tta' / '_data' / 'models' / 'resnet20-fmnist.yaml'}]" in r.stdout
    # an empty search path: non-zero exit and a hint
    shipped = root / "site" / "tta" / "_data"
    shipped.rename(root / "hidden")
    try:
        r = _tta(installed, "list", "models")
    finally:
        (root / "hidden").rename(shipped)
    assert r.returncode == 1 and "(none)" in r.stdout and "no model cards found; looked in" in r.stderr


@pytest.mark.slow  # ~45 s on the shared 2-core box; the other tests here are the install check of `make test`
@pytest.mark.skipif(not FMNIST.is_file(), reason="Fashion-MNIST is not installed")
def test_make_c_and_run_from_an_empty_folder_write_nothing_into_the_package(installed):
    import time

    root, _, empty, env = installed
    since = time.time()
    r = _tta(installed, "make-c", "--dataset", "fashion-mnist", "--severities", "5", "--limit", "200",
             "--no-progress", "--out", str(Path(env["XDG_DATA_HOME"]) / "tta-runtime" / "data" / "fashion-mnist-c"))
    assert r.returncode == 0, r.stderr
    r = _tta(installed, "run", "--adapter", "bn", "--limit", "200", "--no-progress", "--out", "runs/bn")
    assert r.returncode == 0, r.stderr
    assert "fashion-mnist-c error % [gaussian_noise5][#samples=200]:" in r.stdout
    assert (empty / "runs" / "bn" / "results.json").is_file() and (empty / "runs" / "bn" / "run.log").is_file()
    assert _written_into(root / "site", since) == []
    # the missing-data hint points at the per-user data folder, never at site-packages
    r = _tta(installed, "run", "--adapter", "bn", "--stream", "fmnist-c-gradual", "--limit", "10", "--no-progress")
    assert r.returncode == 2 and "tta-runtime/data/fashion-mnist-c" in r.stderr and "site" not in r.stderr


NO_TORCH = """
import importlib.abc, sys
class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "timm"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _NoTorch())
"""


def test_edge_and_cli_without_torch(installed, tmp_path):
    """With torch unimportable: tta.edge runs an exported model; a torch command names the extra."""
    root, _, empty, env = installed
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(NO_TORCH)
    onnx_path = tmp_path / "r20.onnx"
    from tta.export import export_onnx

    export_onnx("resnet20-fmnist", onnx_path, mode="alpha-bn")
    no_torch = {**env, "PYTHONPATH": os.pathsep.join([str(blocker), str(root / "site")])}
    code = f"""
import sys, numpy as np
import tta.edge as edge
adapter = edge.load_adapter({str(onnx_path)!r}, providers="cpu")
x = np.random.default_rng(0).random((8, 3, 32, 32), dtype=np.float32)
print(adapter(x).shape, "torch" in sys.modules)
try:
    import tta
    tta.adapt
except ImportError as exc:
    print(type(exc).__name__, exc)
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=empty, env=no_torch, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "(8, 10) False" in r.stdout
    assert "MissingDependencyError tta.adapt needs the full PyTorch runtime" in r.stdout
    r = subprocess.run([sys.executable, "-c", "import sys; from tta.cli import main; sys.exit(main())", "run",
                        "--adapter", "bn"], cwd=empty, env=no_torch, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == ("tta run: error: tta run needs the full PyTorch runtime (module 'torch' is not "
                                "installed): pip install \"tta-runtime[torch]\"")
    r = subprocess.run([sys.executable, "-c", "import sys; from tta.cli import main; sys.exit(main())", "list"],
                       cwd=empty, env=no_torch, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "resnet20-fmnist" in r.stdout and "tent" in r.stdout, r.stderr
