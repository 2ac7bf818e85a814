"""Where a bounded `StreamPool` keeps the states of the streams it evicts: bytes under string keys.

`StateStore` is deliberately small (write, read, delete, keys) so that object storage or a
serving framework's store can implement it in a few lines; `FolderStateStore` (one file per key,
atomic writes) and `MemoryStateStore` are the two shipped here. What the bytes hold is the pool's
business (a weights-only `torch.save` of the adapted tensors); stores never unpickle anything.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Hashable
from pathlib import Path

from tta.errors import ConfigError
from tta.fileio import write_durable

_SAFE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def stream_key(stream_id: Hashable) -> str:
    """A store key for a stream id: the id itself when it is a short safe string, else a hash of its
    type and repr (ints, tuples, names with '/' or spaces...)."""
    if isinstance(stream_id, str) and _SAFE_KEY.fullmatch(stream_id) and not stream_id.startswith("h-"):
        return stream_id
    text = f"{type(stream_id).__qualname__}:{stream_id!r}"
    return "h-" + hashlib.sha256(text.encode()).hexdigest()[:40]


class StateStore(ABC):
    """Bytes by key. Keys are `stream_key` strings ([A-Za-z0-9._-], at most 100 characters)."""

    @abstractmethod
    def write(self, key: str, data: bytes) -> None:
        """Store `data` under `key`, replacing what was there (atomically: all or nothing)."""

    @abstractmethod
    def read(self, key: str) -> bytes | None:
        """The bytes under `key`, or None."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Forget `key` (no error when absent)."""

    @abstractmethod
    def keys(self) -> list[str]:
        """Every stored key."""

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self.keys()


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not _SAFE_KEY.fullmatch(key):
        raise ConfigError(f"state store keys are 1-100 characters of [A-Za-z0-9._-], got {key!r}")
    return key


class FolderStateStore(StateStore):
    """One file ``<key>.state`` per key in `root` (created when missing), written by
    `tta.fileio.write_durable` as `Adapter.save` writes a state: a crash keeps the old state, and the
    file gets the umask's mode like any saved state."""

    SUFFIX = ".state"

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"state store folder {self.root} exists and is not a folder")
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / f"{_check_key(key)}{self.SUFFIX}"

    def write(self, key: str, data: bytes) -> None:
        write_durable(self._path(key), data)

    def read(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass

    def keys(self) -> list[str]:
        return sorted(p.name[: -len(self.SUFFIX)] for p in self.root.glob(f"*{self.SUFFIX}") if not p.name.startswith("."))


class MemoryStateStore(StateStore):
    """A dict in this process (tests, or a pool whose evicted states need not outlive it)."""

    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def write(self, key: str, data: bytes) -> None:
        with self._lock:
            self._data[_check_key(key)] = bytes(data)

    def read(self, key: str) -> bytes | None:
        with self._lock:
            return self._data.get(_check_key(key))

    def delete(self, key: str) -> None:
        with self._lock:
            self._data.pop(_check_key(key), None)

    def keys(self) -> list[str]:
        with self._lock:
            return sorted(self._data)


__all__ = ["FolderStateStore", "MemoryStateStore", "StateStore", "stream_key"]
