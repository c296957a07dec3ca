"""``avrec serve --replicas N``: N identical, stateless ``avrec serve`` processes.

Each replica is ``python -m avrec.server.app`` with the same settings (model, Redis, clock...) on
its own port: consecutive from ``port`` (``--port 0``: free ports), and with
``--metrics-port M`` consecutive metrics ports from M. The replicas share nothing but the
online store and the data directory, so any of them may answer any call; clients spread
their calls with gRPC's client-side ``round_robin`` over the target this prints
(``ipv4:127.0.0.1:50051,127.0.0.1:50052``; ``avrec.server.client.RankingClient`` sets the service
config). With a replay clock (``--clock``) every
replica is given one ``clock_anchor`` (the wall time at which the clock reads ``--clock``),
so they agree on the time: a row one replica stamps is never "in the future" for another
(a replica starting a second later would otherwise run a second behind and withhold it).
SIGTERM / SIGINT stop them all (each gets ``grace_seconds``); a replica that dies
is reported, not restarted (the others keep serving).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avrec.server.config import ServeConfig

STARTUP_SECONDS = 600.0


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports the OS calls free now (bound together, then released)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def ports_for(n: int, first: int, host: str = "127.0.0.1") -> list[int]:
    """``first``, ``first + 1``, ...; free ports when ``first`` is 0."""
    return free_ports(n, host) if first == 0 else [first + i for i in range(n)]


def client_host(host: str) -> str:
    """The address a local client dials for a server bound to ``host``."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "[::]", "::") else host


def target_of(host: str, ports: list[int]) -> str:
    """gRPC's multi-address target for the replicas (``ipv4:`` or ``ipv6:`` scheme)."""
    host = client_host(host)
    if ":" in host.strip("[]"):
        return "ipv6:" + ",".join(f"[{host.strip('[]')}]:{p}" for p in ports)
    return "ipv4:" + ",".join(f"{host}:{p}" for p in ports)


@dataclass
class Replicas:
    """Running replica processes and their ports."""

    processes: list[subprocess.Popen]
    ports: list[int]
    metrics_ports: list[int]
    host: str
    grace_seconds: float
    exited: set[int] = field(default_factory=set)

    @property
    def target(self) -> str:
        return target_of(self.host, self.ports)

    def addresses(self) -> list[str]:
        return [f"{client_host(self.host)}:{p}" for p in self.ports]

    def stop(self) -> None:
        """SIGTERM each live replica, wait its grace (+5 s), then SIGKILL what is left."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_seconds + 5
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def replica_options(config_file: Path | None, overrides: Mapping[str, Any]) -> list[str]:
    """The ``avrec serve`` options each replica is given: the config file and the settings
    given on the command line (``--replicas`` is not one).

    >>> replica_options(Path("s.yaml"), {"clock": "2018-09-25", "port": 9})
    ['--config', 's.yaml', '--clock', '2018-09-25', '--port', '9']
    """
    argv = ["--config", str(config_file)] if config_file else []
    for name, value in overrides.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv



def replica_command(argv: list[str], port: int, metrics_port: int | None) -> list[str]:
    """``python -m avrec.server.app`` with ``argv`` (the caller's flags minus ``--replicas``) and
    this replica's ports (later flags win in argparse)."""
    command = [sys.executable, "-m", "avrec.server.app", *argv, "--port", str(port)]
    if metrics_port:
        command += ["--metrics-port", str(metrics_port)]
    return command


def start(config: ServeConfig, n: int, argv: list[str],
          startup_seconds: float = STARTUP_SECONDS) -> Replicas:
    """Start ``n`` replicas and wait until each one's health says SERVING."""
    from avrec.server.client import RankingClient

    ports = ports_for(n, config.port, config.host)
    metrics = ports_for(n, config.metrics_port, config.host) if config.metrics_port else []
    env = dict(os.environ)
    if config.clock and config.clock_anchor is None:  # one replay time for all replicas
        env["AVREC_SERVE_CLOCK_ANCHOR"] = repr(time.time())
    processes = [subprocess.Popen(replica_command(argv, port, metrics[i] if metrics else None),
                                  env=env) for i, port in enumerate(ports)]
    replicas = Replicas(processes, ports, metrics, config.host, config.grace_seconds)
    try:
        for process, address in zip(processes, replicas.addresses(), strict=True):
            with RankingClient(address) as client:
                client.wait_until_serving(startup_seconds, process)
    except BaseException:
        replicas.stop()
        raise
    return replicas


def run(config: ServeConfig, n: int, argv: list[str]) -> int:
    """``avrec serve --replicas N``: start, print the target, supervise until a signal."""
    stopped = threading.Event()

    def stop(signum: int, _frame: object) -> None:
        print(f"avrec serve --replicas: signal {signum}, stopping {n} replicas", flush=True)
        stopped.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    replicas = start(config, n, argv)
    for i, (process, port) in enumerate(zip(replicas.processes, replicas.ports, strict=True)):
        metrics = f", metrics {replicas.metrics_ports[i]}" if replicas.metrics_ports else ""
        print(f"avrec serve --replicas: replica {i} pid {process.pid} port {port}{metrics}",
              flush=True)
    print(f"avrec serve --replicas: target {replicas.target}", flush=True)
    while not stopped.wait(1.0):
        for i, process in enumerate(replicas.processes):
            if process.poll() is not None and i not in replicas.exited:
                replicas.exited.add(i)
                print(f"avrec serve --replicas: replica {i} (port {replicas.ports[i]}) exited "
                      f"with code {process.returncode}; {n - len(replicas.exited)} left",
                      flush=True)
        if len(replicas.exited) == n:
            return 1
    replicas.stop()
    return 0
