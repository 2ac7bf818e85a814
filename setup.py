"""Build script: the packages with their shipped data, the build record, and the compiled ops library
`tta._C` (the project metadata is in pyproject.toml).

    pip install --no-build-isolation -e ".[torch,test]"     # development (what `make test` does)
    pip wheel --no-deps --no-build-isolation . -w dist      # the wheel users install

Package data: the repository's top-level `models/` (cards, checkpoints, artefacts) and `streams/`
(specs) folders are installed as `tta/_data/models` and `tta/_data/streams`, read through
`importlib.resources` (`tta.paths`); a source checkout reads them where they are. The wheel also
records the git commit it was built from (`tta/_build.json`, read by `tta.provenance`).

builds `tta._C` from csrc/ with torch.utils.cpp_extension and ninja: the CPU kernels always, the
CUDA kernels (csrc/cuda/*.cu) when the switch says so:

- ``TTA_WITH_CUDA=auto`` (default): CUDA kernels when nvcc is found (``CUDA_HOME``, defaulting to
  /usr/local/cuda) AND torch is a CUDA build. Whether a GPU is visible plays no part, so GPU-less
  build machines produce the same library as GPU machines.
- ``TTA_WITH_CUDA=1``: require them (error if nvcc or CUDA torch is missing); ``0``: CPU only.
- ``TORCH_CUDA_ARCH_LIST`` defaults to "8.0;9.0+PTX" (A100, H100/H200 + PTX for newer parts).
- ``TTA_SKIP_EXT=1`` installs the pure-Python package (the torch reference ops are used).
- ``MAX_JOBS`` caps parallel compile jobs (ninja).

The package works without the library: `tta.ops.backend()` says which backend is active.
CMakeLists.txt builds the same library with CMake (see its header) as a development alternative.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
#: shipped data folders at the repository root -> their package inside the wheel
DATA_PACKAGES = {"tta._data.models": "models", "tta._data.streams": "streams"}
PACKAGE_DATA = {
    "tta": ["py.typed"],
    "tta._data.models": ["*.yaml", "*.safetensors"],
    "tta._data.streams": ["*.yaml"],
}


def _git_commit() -> dict:
    """The commit the build runs from (None outside a git checkout) and whether the tree had changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True, check=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(status.strip())}


class BuildPyWithRecord(build_py):
    """build_py that also writes tta/_build.json (git commit of the build) into the built package."""

    def run(self) -> None:
        super().run()
        if not self.editable_mode:  # an editable install asks git at run time instead
            target = os.path.join(self.build_lib, "tta", "_build.json")
            with open(target, "w") as f:
                json.dump(_git_commit(), f)


def _cuda_home() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home and os.path.isfile("/usr/local/cuda/bin/nvcc"):
        home = "/usr/local/cuda"
    if not home:
        nvcc = shutil.which("nvcc")
        home = os.path.dirname(os.path.dirname(nvcc)) if nvcc else None
    return home if home and os.path.isfile(os.path.join(home, "bin", "nvcc")) else None


def _want_cuda(torch_cuda: str | None) -> bool:
    mode = os.environ.get("TTA_WITH_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"TTA_WITH_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    home = _cuda_home()
    if mode == "1" and (home is None or torch_cuda is None):
        sys.exit(
            "TTA_WITH_CUDA=1 but "
            + ("nvcc was not found (set CUDA_HOME)" if home is None else "torch is not a CUDA build")
        )
    return home is not None and torch_cuda is not None


def _extensions():
    if os.environ.get("TTA_SKIP_EXT", "0") == "1":
        return [], {}
    import torch

    with_cuda = _want_cuda(torch.version.cuda)
    if with_cuda:
        # Before cpp_extension is imported: it resolves the toolkit location at import time.
        os.environ["CUDA_HOME"] = _cuda_home()  # type: ignore[assignment]
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    from torch.utils import cpp_extension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "ops", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx = ["-O3", "-g0", "-fopenmp-simd"]
    kwargs = dict(
        name="tta._C",
        sources=sources,
        extra_compile_args={"cxx": cxx},
        py_limited_api=False,
    )
    if with_cuda:
        kwargs["sources"] = sources + sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-lineinfo"]
        ext = cpp_extension.CUDAExtension(**kwargs)
    else:
        ext = cpp_extension.CppExtension(**kwargs)
    # pip runs this without the venv on PATH: its ninja sits next to the interpreter.
    bin_dir = os.path.dirname(sys.executable)
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()
setup(
    packages=find_packages(include=["tta", "tta.*"]) + list(DATA_PACKAGES),
    package_dir=DATA_PACKAGES,
    package_data=PACKAGE_DATA,
    ext_modules=ext_modules,
    cmdclass={**cmdclass, "build_py": BuildPyWithRecord},
)
