"""The Ray Serve application: an ingress (HTTP on loopback + the Python handle API) and N replicas,
each a `StreamService` (one source model, bounded per-stream adapted state, checkpoints).

Routing: a stream id always goes to replica ``replica_of(id, N)`` (a stable hash), one Serve
deployment per replica (``replica-0``, ``replica-1``, ...). Ray Serve's model multiplexing would
route by id too, but only as a preference (a busy or new replica may get the id), and two replicas
adapting copies of one stream would fork its state; a fixed owner per stream keeps one state per
stream. Order within a stream: the ingress hands a stream's requests to its replica one at a time
(a per-stream lock held until the replica has queued the request), so they are adapted on in the
order the ingress received them, while their predictions are awaited concurrently.

A replica that dies is restarted by Serve; its streams come back from the state store (at most
`checkpoint_every` steps lost each) on their next request, which fails with HTTP 503 only while no
replica is up. On a graceful shutdown every resident stream is checkpointed.

HTTP (``tta serve``, 127.0.0.1 only):

    POST /predict?stream=ID     body: .npy (application/x-npy), one image (image/png|jpeg), or JSON
                                {"stream": ID, "images": [base64...]}; the stream may also be given
                                in the ``X-Stream-Id`` header
        -> {"stream", "step", "replica", "merged_requests", "predictions": [{"class", "confidence"}]}
    POST /reset?stream=ID       -> the stream back to the source state
    GET  /streams/ID            -> the stream's statistics; GET /stats -> every replica's
    GET  /health                -> 200 when every replica answers, else 503

Handle (in-cluster Python callers): ``h = serve.get_app_handle("tta")``;
``h.predict.remote("cam-1", batch).result()`` with `batch` a numpy (N, C, H, W) or (N, H, W, C)
array, uint8 or float in [0, 1]; also ``reset``, ``stream_stats``, ``stats``, ``health``.

Ray metrics (Prometheus, through Ray's metrics export; tags: stream, plus Serve's deployment /
replica / application): ``tta_stream_batches``, ``tta_stream_images`` and ``tta_stream_resets``
(counters), ``tta_stream_steps`` (the stream's adaptation step count), ``tta_stream_entropy`` (mean
prediction entropy of its last batch), ``tta_resident_streams``, ``tta_pool_evictions`` /
``tta_pool_restores`` / ``tta_stream_checkpoints`` (gauges / counters per replica).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import numpy as np
import ray
from ray import serve
from ray.serve import metrics
from starlette.requests import Request
from starlette.responses import JSONResponse

from tta.errors import TTAError
from tta.serve.codec import InputSpec, RequestError, check_batch, decode_body
from tta.serve.config import ServeConfig, check_stream_id, replica_of
from tta.serve.service import StreamService


class Replica:
    """A Serve deployment around one `StreamService`."""

    def __init__(self, config: ServeConfig, index: int) -> None:
        tags = ("stream",)
        self._batches = metrics.Counter("tta_stream_batches", "batches served per stream", tag_keys=tags)
        self._images = metrics.Counter("tta_stream_images", "images served per stream", tag_keys=tags)
        self._resets = metrics.Counter("tta_stream_resets", "resets per stream", tag_keys=tags)
        self._steps = metrics.Gauge("tta_stream_steps", "adaptation steps of the stream's state", tag_keys=tags)
        self._entropy = metrics.Gauge("tta_stream_entropy", "mean prediction entropy of the stream's last batch",
                                      tag_keys=tags)
        self._resident = metrics.Gauge("tta_resident_streams", "adapted states in this replica's memory")
        self._evictions = metrics.Gauge("tta_pool_evictions", "streams evicted to the state store")
        self._restores = metrics.Gauge("tta_pool_restores", "streams restored from the state store")
        self._checkpoints = metrics.Counter("tta_stream_checkpoints", "periodic checkpoints per stream",
                                            tag_keys=tags)
        self.service = StreamService(config, index, on_batch=self._publish)

    def _publish(self, stream_id: str, event: dict[str, Any]) -> None:
        tags = {"stream": stream_id}
        self._batches.inc(1, tags=tags)
        self._images.inc(event["images"], tags=tags)
        self._steps.set(event["steps"], tags=tags)
        self._entropy.set(event["entropy"], tags=tags)
        self._resident.set(event["resident"])
        self._evictions.set(self.service.pool.evictions)
        self._restores.set(self.service.pool.restores)
        if event["checkpointed"]:
            self._checkpoints.inc(1, tags=tags)

    async def submit(self, stream_id: str, batch: np.ndarray) -> int:
        return await self.service.submit(stream_id, batch)

    async def result(self, ticket: int) -> dict[str, Any]:
        return await self.service.result(ticket)

    async def reset(self, stream_id: str) -> dict[str, Any]:
        out = await self.service.reset(stream_id)
        self._resets.inc(1, tags={"stream": stream_id})
        return out

    def stream_stats(self, stream_id: str) -> dict[str, Any]:
        return self.service.stats(stream_id)

    def stats(self) -> dict[str, Any]:
        return self.service.stats()

    def health(self) -> dict[str, Any]:
        return self.service.health()

    def actor_name(self) -> str:
        """This replica's Ray actor name (operations: `ray.get_actor(name, namespace="serve")`)."""
        return ray.get_runtime_context().get_actor_name()

    def check_health(self) -> None:
        """Serve's periodic health check: the worker thread must be alive."""
        if self.service.closed:
            raise RuntimeError("the replica's service is closed")

    def __del__(self) -> None:  # Serve calls it on a graceful shutdown: keep every stream's adaptation
        service = getattr(self, "service", None)
        if service is not None:
            service.close()


class Ingress:
    """HTTP endpoint and handle API; routes each stream to its replica, in order."""

    def __init__(self, config: ServeConfig, *replicas: Any) -> None:
        from tta.models import get_card

        self.config = config
        self.replicas = list(replicas)
        card = get_card(config.card_name())
        self.input = InputSpec(tuple(card.input_size), config.max_request_images, config.max_request_bytes)
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}  # requests holding or waiting for a stream's lock

    # ------------------------------------------------------------------ handle API
    async def predict(self, stream_id: str, images: Any) -> dict[str, Any]:
        """Predict-and-adapt on `images` (numpy (N, C, H, W) / (N, H, W, C), uint8 or float in [0, 1])."""
        check_stream_id(stream_id)
        if not isinstance(images, np.ndarray):
            raise RequestError(f"images must be a numpy array, got {type(images).__name__}")
        return await self._route(stream_id, check_batch(images, self.input))

    async def reset(self, stream_id: str) -> dict[str, Any]:
        check_stream_id(stream_id)
        return await self._replica(stream_id).reset.remote(stream_id)

    async def stream_stats(self, stream_id: str) -> dict[str, Any]:
        check_stream_id(stream_id)
        return await self._replica(stream_id).stream_stats.remote(stream_id)

    async def stats(self) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(r.stats.remote() for r in self.replicas)))

    async def health(self) -> dict[str, Any]:
        answers = await asyncio.gather(*(asyncio.wait_for(_awaitable(r.health.remote()), 10.0) for r in self.replicas),
                                       return_exceptions=True)
        replicas = [a if isinstance(a, dict) else {"replica": i, "status": f"unavailable: {type(a).__name__}"}
                    for i, a in enumerate(answers)]
        ok = all(r.get("status") == "ok" for r in replicas)
        return {"status": "ok" if ok else "degraded", "adapter": self.config.adapter, "model": self.config.card_name(),
                "replicas": replicas}

    async def replica_actor_name(self, stream_id: str) -> str:
        """The Ray actor name of the replica holding `stream_id` (operations, fault drills)."""
        check_stream_id(stream_id)
        return await self._replica(stream_id).actor_name.remote()

    def replica_index(self, stream_id: str) -> int:
        return replica_of(check_stream_id(stream_id), len(self.replicas))

    def _replica(self, stream_id: str) -> Any:
        return self.replicas[replica_of(stream_id, len(self.replicas))]

    async def _route(self, stream_id: str, batch: np.ndarray) -> dict[str, Any]:
        replica = self._replica(stream_id)
        lock = self._locks.setdefault(stream_id, asyncio.Lock())
        self._users[stream_id] = self._users.get(stream_id, 0) + 1
        try:
            async with lock:  # queued at the replica in the order received here (asyncio.Lock is FIFO)
                ticket = await replica.submit.remote(stream_id, batch)
        finally:
            self._users[stream_id] -= 1
            if not self._users[stream_id]:  # nobody holds or waits for it: forget the lock
                del self._users[stream_id], self._locks[stream_id]
        return await replica.result.remote(ticket)

    # ------------------------------------------------------------------ HTTP
    async def __call__(self, request: Request) -> JSONResponse:
        path = request.url.path.rstrip("/") or "/"
        try:
            if request.method == "GET" and path == "/health":
                health = await self.health()
                return JSONResponse(health, status_code=200 if health["status"] == "ok" else 503)
            if request.method == "GET" and path == "/stats":
                return JSONResponse(await self.stats())
            if request.method == "GET" and path.startswith("/streams/"):
                return JSONResponse(await self.stream_stats(path[len("/streams/"):]))
            if request.method == "POST" and path == "/reset":
                return JSONResponse(await self.reset(self._stream_of(request, None)))
            if request.method == "POST" and path == "/predict":
                body = await self._read_body(request)
                batch, named = decode_body(body, request.headers.get("content-type"), self.input)
                stream_id = self._stream_of(request, named)
                return JSONResponse(await self._route(stream_id, batch))
            return JSONResponse({"error": f"no route {request.method} {path}; see GET /health, POST /predict"},
                                status_code=404)
        except Exception as exc:  # noqa: BLE001 - every failure becomes one JSON error
            return _error_response(exc)

    def _stream_of(self, request: Request, named: str | None) -> str:
        stream_id = request.query_params.get("stream") or request.headers.get("x-stream-id") or named
        if not stream_id:
            raise RequestError("no stream id: pass ?stream=ID, an X-Stream-Id header or \"stream\" in a JSON body")
        return check_stream_id(stream_id)

    async def _read_body(self, request: Request) -> bytes:
        limit = self.config.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(f"request body of {declared} bytes exceeds the limit of {limit} bytes", 413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(f"request body exceeds the limit of {limit} bytes", 413)
            chunks.append(chunk)
        return b"".join(chunks)


async def _awaitable(response: Any) -> Any:
    return await response


def _error_response(exc: BaseException) -> JSONResponse:
    cause = getattr(exc, "cause", None) or exc  # a RayTaskError carries the replica's exception
    if isinstance(cause, RequestError):
        return JSONResponse({"error": str(cause.args[0] if cause.args else cause)}, status_code=cause.status)
    if isinstance(cause, TTAError):
        return JSONResponse({"error": " ".join(str(cause).split())}, status_code=400)
    if isinstance(exc, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)) or \
            type(exc).__name__ in ("DeploymentUnavailableError", "BackPressureError"):
        return JSONResponse({"error": f"replica unavailable ({type(exc).__name__}); retry"}, status_code=503)
    return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)


def build_app(config: ServeConfig) -> Any:
    """The bound application: `replicas` replica deployments behind one ingress."""
    replica = serve.deployment(Replica)
    replicas = [
        replica.options(
            name=f"replica-{i}", num_replicas=1, max_ongoing_requests=10_000,
            ray_actor_options={"num_cpus": config.cpus_per_replica},
            health_check_period_s=2.0, health_check_timeout_s=60.0, graceful_shutdown_timeout_s=30.0,
        ).bind(config, i)
        for i in range(config.replicas)
    ]
    ingress = serve.deployment(Ingress).options(name="ingress", num_replicas=1, max_ongoing_requests=10_000,
                                                ray_actor_options={"num_cpus": 0})
    return ingress.bind(config, *replicas)


_STARTED_RAY = False


def deploy(config: ServeConfig) -> Any:
    """Deploy `config` (see `tta.serve.deploy`); returns the application's handle."""
    global _STARTED_RAY
    from tta.serve.service import build_adapter

    build_adapter(config)  # unknown card/adapter/config keys fail here, before Ray starts
    if not ray.is_initialized():
        if config.address:
            ray.init(address=config.address, log_to_driver=False, configure_logging=False)
        else:
            ray.init(num_cpus=max(1, math.ceil(config.replicas * config.cpus_per_replica)), include_dashboard=False,
                     log_to_driver=False, configure_logging=False,
                     _metrics_export_port=config.metrics_port)
            _STARTED_RAY = True
    serve.start(http_options={"host": config.host, "port": config.port})
    return serve.run(build_app(config), name=config.app_name, route_prefix="/")


def shutdown(config: ServeConfig | None = None) -> None:
    """Delete the application (replicas checkpoint their streams), then stop Serve and a Ray instance
    this process started."""
    global _STARTED_RAY
    if not ray.is_initialized():
        return
    try:
        if config is not None:
            serve.delete(config.app_name)
        serve.shutdown()
    finally:
        if _STARTED_RAY:
            ray.shutdown()
            _STARTED_RAY = False


__all__ = ["Ingress", "Replica", "build_app", "deploy", "shutdown"]

