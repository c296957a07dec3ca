"""``avrec serve``: start the ranking service (gRPC + health + reflection + metrics).

At start the server opens the Feast registry, loads the model directory (refusing a model
whose contract does not match the feature services or the embedding version online), loads
the item snapshot from Redis and builds the retrieval index, then listens. SIGTERM / SIGINT
stop it gracefully: new calls are refused, calls in flight get ``grace_seconds`` to finish.
"""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
import threading
from concurrent import futures
from dataclasses import dataclass, fields
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from avrec import commands, tables
from avrec import config as avrec_config
from avrec.commands import Subparsers
from avrec.ranker.contract import ITEM_SERVICE, USER_SERVICE, service_fields
from avrec.ranker.export import latest_model_dir
from avrec.redis_client import connect
from avrec.server import metrics
from avrec.server.blas_threads import limit_blas_threads
from avrec.server.clock import Clock
from avrec.server.config import ServeConfig, load_config
from avrec.server.engine import RankingEngine
from avrec.server.event_log import EventLog
from avrec.server.hot_swap import ModelWatcher
from avrec.server.loop_server import LoopServer
from avrec.server.malformed import MalformedRequestInterceptor
from avrec.server.models import load_serving_models
from avrec.server.protocol import SERVICE_NAME
from avrec.server.service import BearerTokenInterceptor, RankingServicer, add_to_server
from avrec.server.snapshot_process import SnapshotProcess

log = logging.getLogger("avrec.server")
RELOAD_EXIT_SECONDS = 60.0  # how long a stop waits for a running snapshot reload
@dataclass
class Service:
    """A running server and what it serves."""

    server: grpc.Server | LoopServer
    port: int
    engine: RankingEngine
    health: health.HealthServicer
    watcher: ModelWatcher | None = None  # hot swaps; None with a fixed model_dir
    events: EventLog | None = None  # LogEvents' log: its journal is compacted at stop

    def stop(self, grace: float | None = None) -> None:
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.watcher is not None:
            self.watcher.stop()
        self.server.stop(grace).wait()
        if self.events is not None:
            self.events.close()
        # A snapshot reload runs on a daemon thread inside numpy and onnxruntime; killed there
        # by the interpreter's exit, the process aborts. Let it finish (seconds) first.
        if not self.engine.wait_for_reload(RELOAD_EXIT_SECONDS):
            log.warning("a snapshot reload still runs at stop (waited %s s)", RELOAD_EXIT_SECONDS)
        if self.engine.snapshot_process is not None:
            self.engine.snapshot_process.close()


def model_root(config: ServeConfig) -> Path:
    """The models root whose ``LATEST`` names the run to serve (no fixed ``model_dir``)."""
    return (Path(config.model_root) if config.model_root
            else avrec_config.data_dir() / "models" / "ranker")


def build_engine(
    config: ServeConfig, engine_class: type[RankingEngine] = RankingEngine
) -> tuple[RankingEngine, EventLog]:
    """Registry, models (contract-checked), Redis client, first item snapshot."""
    from avrec.feature_store import get_store

    url = config.redis_url or avrec_config.redis_url()
    store = get_store(url)
    fields = service_fields(store, [USER_SERVICE, ITEM_SERVICE])
    model_dir = (Path(config.model_dir) if config.model_dir
                 else latest_model_dir(model_root(config)))
    models = load_serving_models(model_dir, fields, None, threads=config.ort_threads,
                                 hybrid=config.hybrid)
    client = connect(
        url, socket_timeout=config.redis_timeout_seconds,
        socket_connect_timeout=config.redis_timeout_seconds,
    )
    offline = avrec_config.offline_dir()
    items = tables.read_table("items", offline)
    # genres and year feed the hybrid's catalogue features
    catalogue = items.select([c for c in ("item_id", "title", "genres", "year")
                              if c in items.columns])
    clock = Clock(config.clock_start(), config.clock_anchor)
    engine = engine_class(store, client, models, catalogue, config, clock)
    now = engine.clock.now()
    engine.ensure_snapshot(engine.materialization(), now)  # refuses mismatched embeddings
    return engine, EventLog(offline, catalogue["item_id"].to_numpy(),
                            client if config.incremental_events else None,
                            id_window=config.event_id_window,
                            journal_events=config.event_journal_events)


def start(config: ServeConfig, engine_class: type[RankingEngine] = RankingEngine) -> Service:
    """Build and start the server (returns at once; the port is bound). Caps numpy's BLAS
    threads for the whole process first (``blas_threads``, :mod:`avrec.server.blas_threads`)."""
    limit_blas_threads(config.blas_threads)
    engine, events = build_engine(config, engine_class)
    if config.snapshot_process:
        engine.snapshot_process = SnapshotProcess(
            config.redis_url or avrec_config.redis_url(), config.redis_timeout_seconds,
            engine.behaviour_reader, engine.embedding_reader, engine.catalogue)
    # what start loaded (Feast, onnxruntime, torch when installed, the snapshot) stays for
    # good: out of the cyclic GC, whose full passes over it cost tens of ms inside requests
    gc.collect()
    gc.freeze()
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
    ]
    token, write_token = config.token(), config.write_secret()
    interceptors = [BearerTokenInterceptor(token, write_token)] if token or write_token else []
    interceptors.append(MalformedRequestInterceptor())  # garbage: INVALID_ARGUMENT
    if config.grpc_server == "aio":
        server = LoopServer(config.workers, options, interceptors)
    else:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.workers),
                             options=options, interceptors=interceptors)
    health_servicer = health.HealthServicer()
    servicer = RankingServicer(engine, events, engine.store, health_servicer)
    add_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME),
        server,
    )
    address = f"{config.host}:{config.port}"
    if config.tls_cert:
        credentials = grpc.ssl_server_credentials(
            [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())])
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if config.metrics_port:
        metrics.serve_metrics(config.metrics_port, config.host)
    watcher = None
    if not config.model_dir:  # serving LATEST: follow it
        watcher = ModelWatcher(engine, model_root(config), config).start(
            config.model_watch_seconds)
    return Service(server, port, engine, health_servicer, watcher, events)


SIGNAL_POLL_SECONDS = 0.25  # the longest a signal's handler waits for the main thread


def serve(config: ServeConfig) -> int:
    """Run until SIGTERM / SIGINT, then stop gracefully; SIGHUP: look at LATEST now.

    The handlers are in place before the service reports SERVING: a SIGHUP sent as soon as
    a client sees it serve is handled, not the signal's default action. Python runs them in
    the main thread, between bytecodes: when the kernel hands a signal to one of gRPC's
    threads, a main thread blocked in an untimed wait would not run the handler until it
    woke for another reason, so it waits in short slices."""
    stopped, hangup = threading.Event(), threading.Event()
    watcher: list[ModelWatcher] = []  # once the service has started

    def stop(signum, _frame) -> None:
        print(f"avrec serve: signal {signum}, stopping (grace {config.grace_seconds} s)",
              flush=True)
        stopped.set()

    def wake(_signum, _frame) -> None:
        hangup.set()
        if watcher:
            watcher[0].wake()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, wake)
    service = start(config)
    if service.watcher is not None:
        watcher.append(service.watcher)
        if hangup.is_set():  # it came while the service started
            service.watcher.wake()
    models = service.engine.models
    engine = service.engine  # (the counter as requests read it: no reload for the print)
    if engine.snapshot_process is not None:  # its start-up now, not at the first reload
        engine.snapshot_process.start()
    snapshot = engine.ensure_snapshot(engine.materialization(), engine.clock.now()).snapshot
    print(f"avrec serve: listening on {config.host}:{service.port} "
          f"(model {models.version}, {len(snapshot)} items, embeddings "
          f"{snapshot.embedding_version}, ONNX {models.ranker.model.providers[0]}, "
          f"clock {service.engine.clock.now().isoformat()})", flush=True)
    while not stopped.wait(SIGNAL_POLL_SECONDS):
        pass
    service.stop(config.grace_seconds)
    return 0


def register(subparsers: Subparsers) -> argparse.ArgumentParser:
    """``avrec serve`` options (each overrides the config file and AVREC_SERVE_* variables)."""
    parser = subparsers.add_parser("serve", description=__doc__)
    parser.add_argument("--config", type=Path, help="YAML file of ServeConfig settings")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--model-dir", help="a fixed run (default: the one LATEST names, "
                        "followed: a new `avrec train` run is hot-swapped in)")
    parser.add_argument("--model-root", help="the models root whose LATEST is served "
                        "(default: data/models/ranker)")
    parser.add_argument("--model-watch-seconds", type=float,
                        help="how often LATEST is read (0: only on SIGHUP)")
    parser.add_argument("--redis-url", default=argparse.SUPPRESS,
                        help="default: avrec's global --redis-url, then $REDIS_URL")
    parser.add_argument("--clock", help="replay clock start (ISO time); default: wall clock")
    parser.add_argument("--metrics-port", type=int)
    parser.add_argument("--max-candidates", type=int)
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--auth-token-file")
    parser.add_argument("--write-token-file", help="the token LogEvents needs")
    parser.add_argument("--replicas", type=int, default=1,
                        help="start N identical servers on consecutive ports from --port "
                        "(0: free ports) and print their client target (server/replicas.py)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``avrec serve`` with its parsed options."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = {f.name for f in fields(ServeConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in settings and v is not None}
    config = load_config(args.config, overrides)
    if args.replicas > 1:
        from avrec.server import replicas

        return replicas.run(config, args.replicas, replicas.replica_options(args.config, overrides))
    return serve(config)


def main(argv: list[str] | None = None) -> int:
    """``avrec serve`` from ``argv`` (tests, ``python -m avrec.server.app``, each replica)."""
    return commands.main(register, argv)


if __name__ == "__main__":
    sys.exit(main())
