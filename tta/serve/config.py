"""`ServeConfig`: what `tta serve` / `tta.serve.deploy` deploy (imports neither torch nor Ray)."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tta.errors import ConfigError

#: a stream id: 1-200 printable characters (no control characters)
_STREAM_ID = re.compile(r"[^\x00-\x1f\x7f]{1,200}")
LOOPBACK_NAMES = ("localhost",)


@dataclass
class ServeConfig:
    """A deployment of one adapter over one model card on Ray Serve (defaults in brackets).

    model / adapter / preset / overrides: the card, the adapter, its preset and ``key=value`` config
        overrides, as `tta run` takes them [default card, tent, cifar10, none].
    replicas: replicas, each with one source model and its own bounded set of streams; a stream id
        is always routed to the same replica (hash of the id) [1].
    max_streams: adapted states held in memory per replica; the least recently used idle stream is
        evicted to the state store and restored on its next request [64].
    checkpoint_every: a stream's state is also written to the store every K adaptation steps, so a
        replica that dies loses at most K steps of it [10].
    state_dir: the state store folder (shared by the replicas; on a cluster, a folder every node
        mounts) [the per-user data folder's ``serve-states/<card>-<adapter>``].
    max_batch_images: requests of one stream queued together are merged into one adaptation batch
        up to this many images (micro-batching; a request is never split) [256].
    max_request_images / max_request_bytes: request limits (HTTP 413 beyond) [512 / 16 MiB].
    max_pending_per_stream: queued requests per stream before HTTP 429 [64].
    threads: torch threads per replica [1]; cpus_per_replica: Ray CPUs reserved per replica [1].
    host / port: the HTTP endpoint, loopback only [127.0.0.1:8000].
    address: a Ray cluster to join (``ray://...`` or ``auto``); None starts a local Ray instance [None].
    app_name: the Serve application name [tta].
    device: torch device of the replicas [cpu].
    metrics_port: local Ray instance only: port of Ray's Prometheus metrics export [None: Ray picks].
    plugins: modules each replica imports first (they register adapters), as ``tta run --plugin`` [].
    """

    model: str | None = None
    adapter: str = "tent"
    preset: str | None = "cifar10"
    overrides: list[str] = field(default_factory=list)
    replicas: int = 1
    max_streams: int = 64
    checkpoint_every: int = 10
    state_dir: str | None = None
    max_batch_images: int = 256
    max_request_images: int = 512
    max_request_bytes: int = 16 * 2**20
    max_pending_per_stream: int = 64
    threads: int = 1
    cpus_per_replica: float = 1.0
    host: str = "127.0.0.1"
    port: int = 8000
    address: str | None = None
    app_name: str = "tta"
    device: str = "cpu"
    metrics_port: int | None = None
    plugins: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for key in ("replicas", "max_streams", "checkpoint_every", "max_batch_images", "max_request_images",
                    "max_request_bytes", "max_pending_per_stream", "threads"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"serve {key.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if isinstance(self.cpus_per_replica, bool) or not isinstance(self.cpus_per_replica, (int, float)) \
                or not 0 <= self.cpus_per_replica <= 1024:
            raise ConfigError(f"serve cpus-per-replica must be a number >= 0, got {self.cpus_per_replica!r}")
        for key in ("port", "metrics_port"):
            value = getattr(self, key)
            if value is None and key == "metrics_port":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
                raise ConfigError(f"serve {key.replace('_', '-')} must be a port number 1..65535, got {value!r}")
        check_loopback(self.host)
        if not isinstance(self.adapter, str) or not self.adapter:
            raise ConfigError(f"serve adapter must be an adapter name, got {self.adapter!r}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", self.app_name or ""):
            raise ConfigError(f"serve app name must be 1-64 characters of [A-Za-z0-9_.-], got {self.app_name!r}")
        if not isinstance(self.overrides, (list, tuple)):
            raise ConfigError(f"serve overrides must be a list of key=value strings, got {self.overrides!r}")
        self.overrides = list(self.overrides)
        if not isinstance(self.plugins, (list, tuple)):
            raise ConfigError(f"serve plugins must be a list of module names, got {self.plugins!r}")
        self.plugins = list(self.plugins)

    def card_name(self) -> str:
        from tta.models.cards import DEFAULT_CARD

        return self.model or DEFAULT_CARD

    def state_path(self) -> Path:
        """The state store folder (see `state_dir`)."""
        if self.state_dir is not None:
            return Path(self.state_dir).expanduser()
        from tta.paths import user_data_dir

        card = Path(self.card_name()).stem
        return user_data_dir() / "serve-states" / f"{card}-{self.adapter}"

    def replace(self, **changes: Any) -> "ServeConfig":
        return dataclasses.replace(self, **changes)


def check_loopback(host: str) -> str:
    """The HTTP endpoint listens on loopback only (127.0.0.0/8, ::1 or localhost)."""
    if host in LOOPBACK_NAMES:
        return host
    try:
        if ipaddress.ip_address(host).is_loopback:
            return host
    except ValueError:
        pass
    raise ConfigError(f"serve host must be a loopback address (127.0.0.1, ::1, localhost), got {host!r}: the "
                      "endpoint is not authenticated; put a proxy in front of it to expose it")


def check_stream_id(stream_id: object) -> str:
    """A stream id: a string of 1-200 printable characters."""
    if not isinstance(stream_id, str) or not _STREAM_ID.fullmatch(stream_id):
        raise ConfigError(f"stream id must be 1-200 printable characters, got {stream_id!r}")
    return stream_id


def replica_of(stream_id: str, replicas: int) -> int:
    """The replica that holds `stream_id`: a stable hash of the id (same on every process and run)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(stream_id.encode()).digest()[:8], "big") % replicas


__all__ = ["ServeConfig", "check_loopback", "check_stream_id", "replica_of"]
