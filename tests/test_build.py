"""The compiled library: built, loaded, CUDA kernels compiled where a toolkit exists, and the
pure-torch fallback when it is absent."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tta.ops

ROOT = Path(__file__).resolve().parents[1]
SKIPPED_BUILD = os.environ.get("TTA_SKIP_EXT") == "1" or os.environ.get("TTA_DISABLE_C") == "1"
NVCC = os.environ.get("CUDA_HOME", "/usr/local/cuda") + "/bin/nvcc"


@pytest.mark.skipif(SKIPPED_BUILD, reason="the compiled library is switched off (TTA_SKIP_EXT/TTA_DISABLE_C)")
def test_compiled_library_is_loaded():
    assert tta.ops.backend() in ("cpp", "cpp+cuda"), f"tta._C did not load: {tta.ops.LOAD_ERROR}"
    for op in ("bn_calibrate", "bn_calibrate_update", "bn_calibrate_backward", "knn_vote"):
        assert hasattr(torch.ops.tta, op)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tta::{op}", "CPU")


@pytest.mark.skipif(SKIPPED_BUILD or os.environ.get("TTA_WITH_CUDA") == "0",
                    reason="CUDA build switched off (TTA_WITH_CUDA=0 / no compiled library)")
@pytest.mark.skipif(not (os.path.isfile(NVCC) and torch.version.cuda),
                    reason="no nvcc or torch is not a CUDA build: TTA_WITH_CUDA=auto builds CPU kernels only")
def test_cuda_kernels_compiled_with_auto_switch():
    # The editable install ran with TTA_WITH_CUDA=auto: with nvcc + a CUDA torch the .cu sources must
    # have compiled into the library, whether or not a GPU is visible (none is here).
    assert tta.ops.backend() == "cpp+cuda"
    for op in ("bn_calibrate", "bn_calibrate_update", "bn_calibrate_backward", "knn_vote"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tta::{op}", "CUDA")


def test_package_works_without_the_compiled_library():
    code = (
        "import torch, tta, tta.ops\n"
        "assert tta.ops.backend() == 'torch', tta.ops.backend()\n"
        "m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()\n"
        "a = tta.adapt(m, 'alpha-bn', source_weight=0.5)\n"
        "assert a(torch.rand(4, 3, 8, 8)).shape == (4, 4, 6, 6)\n"
        "s = tta.ops.knn_vote(torch.randn(2, 5), torch.randn(9, 5), torch.zeros(9, dtype=torch.long), 3, 4, 0.1)\n"
        "assert torch.allclose(s.sum(1), torch.ones(2))\n"
        "print('ok')\n"
    )
    env = {**os.environ, "TTA_DISABLE_C": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.mark.slow
def test_cpu_only_build_from_scratch(tmp_path):
    """`TTA_WITH_CUDA=0` builds and loads a CPU-only library in a fresh build folder (~1-2 min)."""
    if shutil.which("ninja") is None and not (Path(sys.executable).parent / "ninja").exists():
        pytest.skip("ninja is not installed")
    env = {**os.environ, "TTA_WITH_CUDA": "0", "MAX_JOBS": "2"}
    subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-temp", str(tmp_path / "tmp"),
         "--build-lib", str(tmp_path / "lib")],
        cwd=ROOT, env=env, check=True, capture_output=True, timeout=900,
    )
    (so,) = (tmp_path / "lib" / "tta").glob("_C*.so")
    code = (
        f"import torch; torch.ops.load_library({str(so)!r})\n"
        "assert torch._C._dispatch_has_kernel_for_dispatch_key('tta::knn_vote', 'CPU')\n"
        "assert not torch._C._dispatch_has_kernel_for_dispatch_key('tta::knn_vote', 'CUDA')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
