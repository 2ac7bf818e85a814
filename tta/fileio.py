"""Writing files safely (torch-free): normal permissions and atomic replacement.

Temporary files made with `tempfile.mkstemp` are created 0600 whatever the umask; a saved state or an
export renamed from one would keep that mode. `default_file_mode()` is what `open()` would give
(0666 minus the umask), applied to such files before they are moved into place.

`write_durable` is the one writer of files that must survive a crash (adapter states, whether saved by
`Adapter.save` or evicted to a `FolderStateStore`): a temporary file beside the target, created with
the umask's mode like any other file, flushed and fsynced, renamed over the target, then the folder
fsynced. A writer killed mid-write leaves only its ``.<name>.<pid>.<token>.tmp``; the next write of the
same target removes temporaries whose writing process no longer exists.
"""

from __future__ import annotations

import os
import re
import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TMP_SUFFIX = ".tmp"

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
    """Write `text` (UTF-8) through `write_durable`: a reader never sees half a file, and concurrent
    writers of one target (two `tta matrix` runners sharing a results folder) each use their own
    temporary file."""
    return write_durable(path, text.encode("utf-8"))


def write_durable(path: str | os.PathLike[str], content: bytes | Callable[[BinaryIO], object]) -> Path:
    """Write `content` (bytes, or a function that writes into a binary file) to `path` crash-safely.

    The target is only ever replaced whole: temporary file in the same folder (mode from the umask),
    fsync, atomic rename, fsync of the folder. Stale temporaries of the same target are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for any file
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(content, (bytes, bytearray, memoryview)):
                f.write(content)
            else:
                content(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Remove ``.<name>.<pid>.<token>.tmp`` files of `path` whose writing process is gone."""
    path = Path(path)
    if os.name != "posix" or not path.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)\.[0-9a-f]+{re.escape(TMP_SUFFIX)}$")
    removed = []
    for entry in path.parent.iterdir():
        m = pattern.match(entry.name)
        if m and int(m.group(1)) != os.getpid() and not _process_alive(int(m.group(1))):
            try:
                entry.unlink()
                removed.append(entry)
            except FileNotFoundError:
                pass
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a rename into it) to disk (POSIX; a no-op elsewhere)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
