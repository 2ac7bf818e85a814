"""What produced a result: package version and the git commit of the code (torch-free).

The commit is asked from git when `tta` runs from a source checkout (or an editable install of one);
an installed wheel carries the commit it was built from in ``tta/_build.json`` (written by setup.py).
"""

from __future__ import annotations

import functools
import json
import subprocess
from pathlib import Path
from typing import Any

import tta

DISTRIBUTION = "tta-runtime"


def package_version() -> str:
    """`tta.__version__` (the one source of the version; the wheel's metadata is built from it)."""
    return tta.__version__


@functools.lru_cache(maxsize=1)
def git_commit() -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None, "source": "git" | "wheel" | None}``."""
    package = Path(tta.__file__).resolve().parent
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=package, capture_output=True,
                             text=True, timeout=10)
        if top.returncode == 0 and (Path(top.stdout.strip()) / "tta").resolve() == package:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=package, capture_output=True, text=True,
                                    timeout=10, check=True).stdout.strip()
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=package,
                                    capture_output=True, text=True, timeout=10, check=True).stdout
            return {"commit": commit, "dirty": bool(status.strip()), "source": "git"}
    except (OSError, subprocess.SubprocessError):
        pass
    record = package / "_build.json"
    try:
        data = json.loads(record.read_text())
        return {"commit": data.get("commit"), "dirty": data.get("dirty"), "source": "wheel"}
    except (OSError, ValueError, AttributeError):
        return {"commit": None, "dirty": None, "source": None}


def provenance() -> dict[str, Any]:
    """``{"package": "tta-runtime", "version": ..., "git": {...}}`` for result files."""
    return {"package": DISTRIBUTION, "version": package_version(), "git": git_commit()}
