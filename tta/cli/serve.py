"""`tta serve`: deploy an adapter over a model card on Ray Serve (per-stream adapted state).

    tta serve [--adapter tent] [--model CARD] [--replicas 2] [--port 8000] [--state-dir DIR]
    curl -X POST --data-binary @batch.npy -H 'Content-Type: application/x-npy' \
         'http://127.0.0.1:8000/predict?stream=cam-1'

With no --address a local Ray instance is started (no dashboard, CPUs = replicas x --cpus-per-replica);
--address joins a running cluster. The HTTP endpoint listens on loopback only. The command runs until
interrupted (Ctrl-C / SIGTERM) or for --duration seconds, then deletes the application: every resident
stream is checkpointed to the state store first. Needs the serve extra: pip install "tta-runtime[serve]".
"""

from __future__ import annotations

import argparse
import signal
import threading
import time


def serve(args: argparse.Namespace) -> int:
    import ray  # noqa: F401 - a missing extra is reported (one line, exit 2) before anything loads
    import ray.serve  # noqa: F401

    from tta.errors import ConfigError
    from tta.serve import ServeConfig, deploy, shutdown

    if args.duration is not None and not args.duration > 0:
        raise ConfigError(f"--duration must be > 0 seconds, got {args.duration}")
    config = ServeConfig(
        model=args.model, adapter=args.adapter, preset=args.preset, overrides=args.assignments,
        replicas=args.replicas, max_streams=args.max_streams, checkpoint_every=args.checkpoint_every,
        state_dir=args.state_dir, max_batch_images=args.max_batch_images,
        max_request_images=args.max_request_images, max_request_bytes=int(args.max_request_mb * 2**20),
        threads=args.threads, cpus_per_replica=args.cpus_per_replica, host=args.host, port=args.port,
        address=args.address, app_name=args.app_name, metrics_port=args.metrics_port, plugins=args.plugins,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    deploy(config)
    try:
        print(f"tta serve: {config.adapter} on {config.card_name()}, {config.replicas} replica(s), "
              f"http://{config.host}:{config.port} (POST /predict?stream=ID, POST /reset?stream=ID, "
              f"GET /streams/ID, GET /health); state store {config.state_path()}; "
              f"{'Ray cluster ' + config.address if config.address else 'local Ray instance'}", flush=True)
        deadline = None if args.duration is None else time.monotonic() + args.duration
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            stop.wait(0.5)
    finally:
        shutdown(config)
        print("tta serve: stopped; resident streams checkpointed", flush=True)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve an adapter over a model card on Ray Serve (many streams)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default="tent", help="adapter name (default: tent)")
    parser.add_argument("--model", default=None, help="model card name or YAML path (default: the built-in card)")
    parser.add_argument("--preset", default="cifar10", help="adapter config preset (default: cifar10)")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="override one adapter config field (repeatable)")
    parser.add_argument("--replicas", type=int, default=1, help="replicas; a stream always goes to the same one")
    parser.add_argument("--max-streams", type=int, default=64,
                        help="adapted states in memory per replica (LRU; evicted ones go to the state store)")
    parser.add_argument("--checkpoint-every", type=int, default=10, metavar="K",
                        help="write a stream's state to the store every K steps (a crash loses at most K)")
    parser.add_argument("--state-dir", default=None,
                        help="state store folder (default: the per-user data folder's serve-states/<card>-<adapter>)")
    parser.add_argument("--max-batch-images", type=int, default=256,
                        help="queued requests of one stream are merged into one batch up to this many images")
    parser.add_argument("--max-request-images", type=int, default=512, help="images per request (HTTP 413 beyond)")
    parser.add_argument("--max-request-mb", type=float, default=16.0, help="request body size limit in MiB")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0, help="Ray CPUs reserved per replica")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host: a loopback address only")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--address", default=None, help="join this Ray cluster (default: start a local instance)")
    parser.add_argument("--app-name", default="tta", help="Serve application name (handle: serve.get_app_handle)")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="local instance: port of Ray's Prometheus metrics export")
    parser.add_argument("--duration", type=float, default=None, metavar="SECONDS",
                        help="stop after this many seconds (default: run until interrupted)")
    parser.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="MODULE",
                        help="import MODULE in every replica first (it registers adapters); repeatable")
    parser.set_defaults(func=serve)
