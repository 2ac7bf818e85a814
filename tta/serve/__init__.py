"""Serving many streams on Ray Serve: one adapter over one model card, per-stream adapted state.

    from tta.serve import ServeConfig, deploy, shutdown
    handle = deploy(ServeConfig(adapter="tent", replicas=2))     # local Ray instance, HTTP on 127.0.0.1:8000
    out = handle.predict.remote("cam-1", batch).result()         # {"step": ..., "predictions": [...]}
    shutdown()

`tta serve` is the command-line form. `ServeConfig` (`tta.serve.config`) holds the settings and their
defaults, `StreamService` (`tta.serve.service`) what one replica does (usable without Ray), and
`tta.serve.app` the Ray Serve deployments, the HTTP routes and the metrics. Ray Serve comes with the
``serve`` extra: ``pip install "tta-runtime[serve]"``.
"""

from __future__ import annotations

from typing import Any

from tta.serve.config import ServeConfig, check_stream_id, replica_of


def deploy(config: ServeConfig | None = None) -> Any:
    """Start (or join, with ``config.address``) Ray, deploy the application and return its handle.
    The card, adapter and config overrides are checked before Ray starts."""
    from tta.serve.app import deploy as _deploy

    return _deploy(config or ServeConfig())


def shutdown(config: ServeConfig | None = None) -> None:
    """Stop the application (replicas checkpoint their streams) and a Ray instance `deploy` started."""
    from tta.serve.app import shutdown as _shutdown

    _shutdown(config)


def __getattr__(name: str) -> Any:
    if name == "StreamService":
        from tta.serve.service import StreamService

        return StreamService
    raise AttributeError(f"module 'tta.serve' has no attribute {name!r}")


__all__ = ["ServeConfig", "StreamService", "check_stream_id", "deploy", "replica_of", "shutdown"]
