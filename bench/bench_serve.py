"""Load test of `tta serve` on loopback against the in-process `StreamPool` on the same batches.

S streams (default 8), each a different corruption order of Fashion-MNIST-C severity 5 (stream i
visits the 15 corruptions in its own seeded order, one batch per visit, images drawn at random from
the 10,000 of each corruption). One client thread per stream sends its batches in order, each after
the previous answer. Runs, side by side in one process:

1. baseline: the in-process `StreamPool` (same adapter, same bound on resident states), driven by the
   same client threads through one worker thread (the compute model of one replica: one worker,
   `--threads` torch threads);
2. `tta serve` with 1 replica, then with 2 replicas (a local Ray instance, HTTP on 127.0.0.1, torch
   threads per replica `--threads`, so 2 replicas use 2 cores): images/s, latency p50/p95 per
   request, the ratios, and per-stream predictions compared with the baseline's (equal = state
   isolation, through evictions and restores: `--max-streams` states per replica for S streams);
3. fault: one stream runs alone; after `--kill-after` steps the replica holding it is killed
   (`ray.kill` on its actor); the client retries until the restarted replica answers, and the run
   reports the steps lost (steps before the kill minus the step the stream resumed from, at most
   `--checkpoint-every`) and that its next answers equal a reference adapter replayed from the
   checkpointed step.

Everything is bounded: at most `--max-requests` requests and `--max-seconds` per run; the script stops
by itself. Ray start-up is not timed (the clock starts once the application answers).

    TTA_DATA_DIR=/work/main/data nice -n 10 python bench/bench_serve.py --streams 8 --batches 15 \
        --batch-size 32 --adapter tent --max-streams 2 --checkpoint-every 5 --json runs/serve.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def make_streams(n_streams: int, batches: int, batch_size: int, seed: int) -> dict[str, list[np.ndarray]]:
    """Stream i: the 15 corruptions of Fashion-MNIST-C severity 5 in its own order, one batch per visit."""
    from tta.paths import data_root
    from tta.streams.datasets import CorruptionArraySet
    from tta.streams.names import STANDARD_ORDER

    data = CorruptionArraySet(data_root() / "fashion-mnist-c", num_classes=10)
    domains = {c: data.domain(c, 5) for c in STANDARD_ORDER}
    streams: dict[str, list[np.ndarray]] = {}
    for i in range(n_streams):
        rng = np.random.default_rng(seed + i)
        order = [STANDARD_ORDER[j] for j in rng.permutation(len(STANDARD_ORDER))]
        out = []
        for b in range(batches):
            dom = domains[order[b % len(order)]]
            idx = np.sort(rng.choice(len(dom), batch_size, replace=False))
            out.append((dom.images(idx).transpose(0, 3, 1, 2).astype(np.float32) / 255.0))
        streams[f"stream-{i}"] = out
    return streams


def run_pool(template, streams, max_streams: int, threads: int, max_requests: int, max_seconds: float) -> dict:
    """The in-process baseline: StreamPool behind one worker thread, one client thread per stream."""
    import torch

    from tta.engine import FolderStateStore, StreamPool

    torch.set_num_threads(threads)
    store_dir = tempfile.mkdtemp(prefix="tta-bench-pool-")
    pool = StreamPool(template.fork(), device="cpu", max_streams=max_streams, store=FolderStateStore(store_dir))
    worker = ThreadPoolExecutor(max_workers=1)
    warm = next(iter(streams.values()))[0]
    worker.submit(pool.step, "warm-up", torch.from_numpy(warm)).result()
    pool.remove("warm-up")
    classes: dict[str, list[int]] = {s: [] for s in streams}
    latencies: list[float] = []
    lock = threading.Lock()
    budget = [max_requests]
    deadline = time.perf_counter() + max_seconds
    images = [0]

    def client(sid, batches):
        for x in batches:
            with lock:
                if budget[0] <= 0 or time.perf_counter() > deadline:
                    return
                budget[0] -= 1
            t0 = time.perf_counter()
            out = worker.submit(pool.step, sid, torch.from_numpy(x)).result()
            ms = (time.perf_counter() - t0) * 1e3
            with lock:
                latencies.append(ms)
                images[0] += len(x)
                classes[sid].extend(out.softmax(1).argmax(1).tolist())

    t0 = time.perf_counter()
    ts = [threading.Thread(target=client, args=item) for item in streams.items()]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    seconds = time.perf_counter() - t0
    worker.shutdown()
    stats = pool.stats()
    pool.close()
    return {"images": images[0], "seconds": seconds, "images_per_s": images[0] / seconds,
            "p50_ms": float(np.percentile(latencies, 50)), "p95_ms": float(np.percentile(latencies, 95)),
            "requests": len(latencies), "classes": classes, "evictions": stats["evictions"],
            "restores": stats["restores"]}


def warm_ids(replicas: int) -> list[str]:
    """One throw-away stream id per replica (model load, first-step allocations), never a test stream."""
    from tta.serve import replica_of

    ids, i = {}, 0
    while len(ids) < replicas:
        sid = f"warm-up-{i}"
        ids.setdefault(replica_of(sid, replicas), sid)
        i += 1
    return list(ids.values())


def run_serve(args, config, streams) -> dict:
    from ray import serve

    from tta.serve.app import deploy
    from tta.serve.loadtest import post_npy, run_load

    t0 = time.perf_counter()
    handle = deploy(config)
    startup = time.perf_counter() - t0
    conn = http.client.HTTPConnection(config.host, config.port, timeout=300)
    warm = next(iter(streams.values()))[0]
    for sid in warm_ids(config.replicas):
        status, doc = post_npy(conn, sid, warm)
        assert status == 200, doc
    conn.close()
    load = run_load(config.host, config.port, streams, max_requests=args.max_requests, max_seconds=args.max_seconds)
    stats = handle.stats.remote().result()
    serve.delete(config.app_name)
    return {"startup_s": startup, "images": load.images, "seconds": load.seconds, "images_per_s": load.images_per_s,
            "p50_ms": load.percentile(50), "p95_ms": load.percentile(95), "requests": load.requests,
            "stopped_by": load.stopped_by, "errors": {s: e for s, e in load.errors.items() if e},
            "classes": {s: load.classes(s) for s in streams},
            "steps": {s: (load.answers[s][-1]["step"] if load.answers[s] else 0) for s in streams},
            "evictions": sum(r["evictions"] for r in stats), "restores": sum(r["restores"] for r in stats)}


def run_fault(args, config, template, batches: list[np.ndarray]) -> dict:
    """Kill the replica holding one stream after `kill_after` steps; report what it lost and that it goes on."""
    import ray
    import torch
    from ray import serve

    from tta.serve.app import deploy
    from tta.serve.loadtest import post_npy

    handle = deploy(config)
    sid = "fault-stream"
    conn = http.client.HTTPConnection(config.host, config.port, timeout=300)
    answers = []
    for x in batches[: args.kill_after]:
        status, doc = post_npy(conn, sid, x)
        assert status == 200, doc
        answers.append(doc)
    steps_before = answers[-1]["step"]
    name = handle.replica_actor_name.remote(sid).result()
    t_kill = time.perf_counter()
    ray.kill(ray.get_actor(name, namespace="serve"))
    after, failures = [], 0
    deadline = time.perf_counter() + args.max_seconds
    rest = batches[args.kill_after:]
    i = 0
    conn.close()
    while i < len(rest) and time.perf_counter() < deadline:
        conn = http.client.HTTPConnection(config.host, config.port, timeout=300)
        try:
            status, doc = post_npy(conn, sid, rest[i])
        except (OSError, http.client.HTTPException):
            status, doc = 599, {}
        finally:
            conn.close()
        if status != 200:
            failures += 1
            time.sleep(0.5)
            continue
        if not after:
            recovery_s = time.perf_counter() - t_kill
        after.append(doc)
        i += 1
    stats = handle.stream_stats.remote(sid).result()
    serve.delete(config.app_name)
    if not after:
        return {"steps_before_kill": steps_before, "recovered": False, "failed_requests": failures}
    resumed_from = stats["restored_step"]
    # reference: replay the checkpointed steps, then the batches sent after the kill
    reference = template.fork()
    for x in batches[:resumed_from]:
        reference(torch.from_numpy(x))
    equal = all(
        [p["class"] for p in doc["predictions"]] == reference(torch.from_numpy(x)).softmax(1).argmax(1).tolist()
        for doc, x in zip(after, rest)
    )
    return {"steps_before_kill": steps_before, "resumed_from_step": resumed_from,
            "lost_steps": steps_before - resumed_from, "checkpoint_every": config.checkpoint_every,
            "failed_requests_while_down": failures, "recovery_s": recovery_s,
            "steps_after": [d["step"] for d in after], "continues_equal_to_replayed_reference": equal,
            "recovered": True}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--batches", type=int, default=15, help="batches per stream")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--adapter", default="tent")
    p.add_argument("--replicas", default="1,2")
    p.add_argument("--max-streams", type=int, default=2, help="resident states per replica (evictions beyond)")
    p.add_argument("--checkpoint-every", type=int, default=5)
    p.add_argument("--kill-after", type=int, default=8, help="fault run: steps before the replica is killed")
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica (and for the baseline)")
    p.add_argument("--port", type=int, default=18300)
    p.add_argument("--max-requests", type=int, default=2000)
    p.add_argument("--max-seconds", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-fault", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import ray
    import torch

    from tta.serve import ServeConfig
    from tta.serve.service import build_adapter

    torch.set_num_threads(args.threads)
    replicas = [int(r) for r in args.replicas.split(",")]
    streams = make_streams(args.streams, args.batches, args.batch_size, args.seed)
    base = ServeConfig(adapter=args.adapter, max_streams=args.max_streams, checkpoint_every=args.checkpoint_every,
                       threads=args.threads, port=args.port, max_batch_images=args.batch_size)
    template = build_adapter(base)
    ray.init(num_cpus=max(replicas), include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    report: dict = {"machine": f"{platform.machine()} {platform.processor()}".strip(), "torch": torch.__version__,
                    "ray": ray.__version__, "args": vars(args)}
    print(f"{args.streams} streams x {args.batches} batches x {args.batch_size} images, {args.adapter}, "
          f"{args.max_streams} resident states per replica, K={args.checkpoint_every}", flush=True)
    pool = run_pool(template, streams, args.max_streams, args.threads, args.max_requests, args.max_seconds)
    print(f"in-process pool: {pool['images_per_s']:.1f} images/s, p50 {pool['p50_ms']:.1f} ms, "
          f"p95 {pool['p95_ms']:.1f} ms ({pool['evictions']} evictions)", flush=True)
    report["pool"] = {k: v for k, v in pool.items() if k != "classes"}
    for r in replicas:
        config = base.replace(replicas=r, state_dir=tempfile.mkdtemp(prefix=f"tta-bench-serve{r}-"))
        out = run_serve(args, config, streams)
        equal = {s: out["classes"][s] == pool["classes"][s] for s in streams}
        out["equal_to_pool"] = all(equal.values())
        out["equal_streams"] = sum(equal.values())
        ratio = out["images_per_s"] / pool["images_per_s"]
        print(f"serve, {r} replica(s): {out['images_per_s']:.1f} images/s ({ratio:.2f}x the pool), "
              f"p50 {out['p50_ms']:.1f} ms, p95 {out['p95_ms']:.1f} ms, {out['evictions']} evictions / "
              f"{out['restores']} restores, predictions equal to the pool on {out['equal_streams']}/{len(streams)} "
              f"streams, stopped by {out['stopped_by']}", flush=True)
        report[f"serve_{r}"] = {k: v for k, v in out.items() if k != "classes"}
    if len(replicas) > 1:
        a, b = report[f"serve_{replicas[0]}"], report[f"serve_{replicas[-1]}"]
        print(f"{replicas[-1]} vs {replicas[0]} replicas: {b['images_per_s'] / a['images_per_s']:.2f}x images/s",
              flush=True)
    if not args.no_fault:
        batches = streams["stream-0"]
        config = base.replace(replicas=1, state_dir=tempfile.mkdtemp(prefix="tta-bench-fault-"))
        fault = run_fault(args, config, template, batches)
        report["fault"] = fault
        print(f"fault: replica killed after step {fault['steps_before_kill']}; " + (
            f"resumed from step {fault['resumed_from_step']} (lost {fault['lost_steps']} steps, K = "
            f"{fault['checkpoint_every']}), back after {fault['recovery_s']:.1f} s with "
            f"{fault['failed_requests_while_down']} failed requests, steps after: {fault['steps_after']}, "
            f"equal to the replayed reference: {fault['continues_equal_to_replayed_reference']}"
            if fault["recovered"] else "did not recover within the time bound"), flush=True)
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    ok = all(report[f"serve_{r}"]["equal_to_pool"] for r in replicas) and \
        (args.no_fault or report["fault"].get("continues_equal_to_replayed_reference", False))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
