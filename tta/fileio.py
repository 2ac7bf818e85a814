"""Writing files safely (torch-free): normal permissions and atomic replacement.

Temporary files made with `tempfile.mkstemp` are created 0600 whatever the umask; a saved state or an
export renamed from one would keep that mode. `default_file_mode()` is what `open()` would give
(0666 minus the umask), applied to such files before they are moved into place.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask (read from /proc on Linux, else set-and-restore under a lock)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    """Mode bits of a new regular file under the current umask (0644 under the usual umask 022)."""
    return 0o666 & ~current_umask()


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` to ``<path>.tmp`` and rename it onto `path` (a reader never sees half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
