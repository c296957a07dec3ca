"""One way to name the online store and one client factory, for a single Redis or a Redis
Cluster.

A single Redis is a ``redis://`` / ``rediss://`` URL as redis-py reads it. A cluster is

    redis+cluster://[user[:password]@]host:port[,host:port...][/0][?ssl_ca_certs=...]

(``rediss+cluster://`` for TLS): the nodes listed are startup nodes; the client learns the
rest of the cluster from any one that answers, so listing every node lets a process start
while some are down. A cluster has only database 0. :func:`connect` returns a ``redis.Redis``
or a ``redis.cluster.RedisCluster`` for either; everything avrec does on the online store is
a per-key command or a non-transactional pipeline, which redis-py's cluster client splits by
node.

:data:`STORE_ERRORS` are the redis-py errors that mean "the store cannot answer now" (a node
down, a cluster without a master for some slots, a failover in progress): callers turn them
into :class:`avrec.errors.StoreUnavailableError` (gRPC UNAVAILABLE).

>>> parse_cluster_url("redis+cluster://a%40b:p%2Cw@10.0.0.1:7000,[::1]:7001/0").nodes
[('10.0.0.1', 7000), ('::1', 7001)]
>>> is_cluster("redis://127.0.0.1:6379/0"), is_cluster("redis+cluster://h:7000")
(False, True)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote

import redis
from redis.exceptions import (
    AskError,
    ClusterError,
    ReadOnlyError,
    RedisClusterException,
    TryAgainError,
)

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
TLS_STRINGS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
TLS_FLAGS = ("ssl_check_hostname",)

# ClusterError covers ClusterDownError and MasterDownError; AskError covers MovedError (a
# storm of redirections during a failover); RedisClusterException is what redis-py raises when
# no startup node answers or the nodes disagree on the slots while one takes over.
STORE_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError, redis.TimeoutError, ClusterError, TryAgainError, AskError,
    ReadOnlyError, RedisClusterException,
)


Client = redis.Redis | redis.RedisCluster  # what connect() returns


@dataclass(frozen=True)
class ClusterURL:
    """A parsed ``redis+cluster://`` URL."""

    nodes: list[tuple[str, int]]
    username: str | None = None
    password: str | None = None
    tls: bool = False
    options: dict[str, str] = field(default_factory=dict)  # TLS settings of the query


def is_cluster(url: str) -> bool:
    """True for a ``redis+cluster://`` or ``rediss+cluster://`` URL."""
    return url.split("://", 1)[0].lower() in CLUSTER_SCHEMES


def cluster_url(nodes: list[tuple[str, int]], tls: bool = False) -> str:
    """The URL naming a cluster by its (startup) nodes."""
    hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in nodes)
    return f"{CLUSTER_SCHEMES[tls]}://{hosts}/0"


def parse_cluster_url(url: str) -> ClusterURL:
    """Nodes, credentials (URL-decoded) and TLS settings of a cluster URL; ValueError if bad."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in CLUSTER_SCHEMES:
        raise ValueError(f"not a redis+cluster:// URL: {url!r}")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    if path.strip("/") not in ("", "0"):
        raise ValueError(f"a Redis Cluster has only database 0, not {path!r}: {url!r}")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    nodes = [_host_port(part, url) for part in hosts.split(",") if part]
    if not nodes:
        raise ValueError(f"no node in {url!r}")
    options = {k: unquote(v[0]) for k, v in parse_qs(query).items()
               if k in TLS_STRINGS + TLS_FLAGS}
    return ClusterURL(nodes, username, password, scheme.lower() == CLUSTER_SCHEMES[1], options)


def _host_port(part: str, url: str) -> tuple[str, int]:
    if part.startswith("["):
        host, _, port = part[1:].partition("]:")
    else:
        host, _, port = part.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"node {part!r} of {url!r} is not host:port")
    return host, int(port)


def connect(url: str, socket_timeout: float | None = None,
            socket_connect_timeout: float | None = None,
            **kwargs: Any) -> Client:
    """A client for ``url``: ``redis.Redis.from_url`` for a single Redis (as before), a
    ``RedisCluster`` for a cluster URL.

    The cluster client retries a command that met a down node or a moved slot up to 3
    times, re-reading the slot map each time (a promoted replica is found within the
    request); what still fails raises one of :data:`STORE_ERRORS`.
    """
    timeouts = {"socket_timeout": socket_timeout,
                "socket_connect_timeout": socket_connect_timeout}
    if not is_cluster(url):
        return redis.Redis.from_url(url, **timeouts, **kwargs)
    from redis.backoff import ExponentialWithJitterBackoff
    from redis.cluster import ClusterNode, RedisCluster
    from redis.retry import Retry

    parsed = parse_cluster_url(url)
    tls: dict[str, Any] = {}
    if parsed.tls:
        tls["ssl"] = True
        for name, value in parsed.options.items():
            tls[name] = value.lower() in ("1", "true", "yes") if name in TLS_FLAGS else value
    return RedisCluster(
        startup_nodes=[ClusterNode(h, p) for h, p in parsed.nodes],
        username=parsed.username, password=parsed.password,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 3),
        require_full_coverage=False,  # a failed master's slots fail, not the whole client
        **timeouts, **tls, **kwargs,
    )

