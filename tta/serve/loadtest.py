"""A bounded load generator for the serving endpoint (loopback HTTP; used by bench/bench_serve.py and
the Ray tests): one client thread per stream sends that stream's batches in order, each after the
previous answer; the whole run stops by itself after `max_requests` requests or `max_seconds`,
whichever comes first. Imports neither torch nor Ray."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tta.serve.codec import encode_npy


@dataclass
class LoadResult:
    """What the clients saw: per-stream answers in order, latencies (ms) and the wall time."""

    answers: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    errors: dict[str, list[str]] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    images: int = 0
    requests: int = 0
    seconds: float = 0.0
    stopped_by: str = "done"  # "done" | "max_requests" | "max_seconds"

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def classes(self, stream_id: str) -> list[int]:
        return [p["class"] for a in self.answers.get(stream_id, []) for p in a["predictions"]]


def post_npy(conn: http.client.HTTPConnection, stream_id: str, batch: np.ndarray,
             timeout: float | None = None) -> tuple[int, dict[str, Any]]:
    """One POST /predict of an .npy batch on an open connection: (status, JSON answer)."""
    body = encode_npy(batch)
    path = "/predict?" + urllib.parse.urlencode({"stream": stream_id})
    conn.request("POST", path, body=body, headers={"Content-Type": "application/x-npy"})
    response = conn.getresponse()
    data = response.read()
    try:
        doc = json.loads(data)
    except json.JSONDecodeError:
        doc = {"error": data[:200].decode(errors="replace")}
    return response.status, doc


def run_load(
    host: str,
    port: int,
    streams: Mapping[str, Sequence[np.ndarray]],
    *,
    max_requests: int,
    max_seconds: float,
    timeout: float = 120.0,
    on_answer: Callable[[str, dict[str, Any]], None] | None = None,
) -> LoadResult:
    """Send every stream's batches concurrently (one thread per stream, in order within a stream) until
    all are sent, `max_requests` requests were made, or `max_seconds` passed."""
    if max_requests < 1 or not max_seconds > 0:
        raise ValueError("a load test needs max_requests >= 1 and max_seconds > 0")
    result = LoadResult(answers={s: [] for s in streams}, errors={s: [] for s in streams})
    lock = threading.Lock()
    budget = [max_requests]
    deadline = time.perf_counter() + max_seconds

    def take() -> bool:
        with lock:
            if budget[0] <= 0:
                result.stopped_by = "max_requests"
                return False
            if time.perf_counter() >= deadline:
                result.stopped_by = "max_seconds"
                return False
            budget[0] -= 1
            return True

    def client(stream_id: str, batches: Sequence[np.ndarray]) -> None:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            for batch in batches:
                if not take():
                    return
                t0 = time.perf_counter()
                try:
                    status, doc = post_npy(conn, stream_id, batch)
                except (OSError, http.client.HTTPException) as exc:
                    conn.close()
                    conn = http.client.HTTPConnection(host, port, timeout=timeout)
                    with lock:
                        result.errors[stream_id].append(f"{type(exc).__name__}: {exc}")
                    continue
                ms = (time.perf_counter() - t0) * 1e3
                with lock:
                    result.requests += 1
                    if status == 200:
                        result.answers[stream_id].append(doc)
                        result.latencies_ms.append(ms)
                        result.images += len(batch)
                    else:
                        result.errors[stream_id].append(f"HTTP {status}: {doc.get('error')}")
                if status == 200 and on_answer is not None:
                    on_answer(stream_id, doc)
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(sid, b), daemon=True) for sid, b in streams.items()]
    t_start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.perf_counter()) + timeout)
    result.seconds = time.perf_counter() - t_start
    return result


__all__ = ["LoadResult", "post_npy", "run_load"]
