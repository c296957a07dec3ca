"""``avrec serve`` settings: defaults, then a YAML file, then ``AVREC_SERVE_*`` variables, then
command-line flags (each layer overrides the one before).

Example ``serve.yaml``::

    port: 50051
    model_dir: data/models/ranker/20261129T030000-1a2b3c4d
    clock: "2018-09-25T00:00:00Z"   # replay a historical dataset; omit for the wall clock
    auth_token_file: /run/secrets/avrec-token
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from avrec.ranker.cpu_share import usable_cpus

ENV_PREFIX = "AVREC_SERVE_"


GRPC_SERVERS = ("aio", "threads")


@dataclass(frozen=True)
class ServeConfig:
    """Everything the service reads at start."""

    host: str = "127.0.0.1"
    port: int = 50051
    model_dir: str | None = None  # default: the newest run of `avrec train`
    # the models root whose LATEST names the run to serve when model_dir is unset (default
    # data/models/ranker); LATEST is watched and a new run hot-swapped in (server/hot_swap.py)
    model_root: str | None = None
    model_watch_seconds: float = 10.0  # how often LATEST is read (0: only on SIGHUP)
    redis_url: str | None = None  # default: $REDIS_URL
    clock: str | None = None  # ISO time the replay clock starts at; None = wall clock
    # wall time (Unix s) at which the replay clock reads `clock` (default: the process's start);
    # `avrec serve --replicas` gives every replica the same one
    clock_anchor: float | None = None
    max_candidates: int = 2000
    max_top_k: int = 1000
    retrieval_candidates: int = 200
    snapshot_refresh_seconds: float = 60.0
    # background snapshot reloads read Redis in a child process (server/snapshot_process.py);
    # false: in the serving process, pausing between chunks
    snapshot_process: bool = True
    redis_timeout_seconds: float = 1.0
    ort_threads: int = 1
    # numpy's BLAS threads in the serving process (server/blas_threads.py): a request's
    # products are small, and a second thread only contends (scale out with --replicas)
    blas_threads: int = 1
    # "aio": grpc.aio, Rank and Recommend on one event loop thread (server/loop_server.py);
    # "threads": grpc's thread-pool server, every call on one of `workers` threads
    grpc_server: str = "aio"
    workers: int = 8  # threads for the calls not run on the loop (LogEvents, health, ...)
    # requests running the hybrid pipeline at once; the others wait their turn. Python
    # threads that each release and retake the GIL around many short numpy calls queue
    # behind one another (hybrid Rank 1x200, 16 callers: 233 req/s unbounded, 309-330 with
    # 2 slots); 0: one per CPU this process may use. It bounds the thread-pool server
    # (grpc_server: threads); on the event loop requests score one at a time anyway
    compute_slots: int = 0
    # the hybrid's per-user generator outputs kept for the user's next request (LRU, keyed by
    # the history: ranker/user_score_cache.py); ~0.5 MB each for 9,742 items. 0: none
    user_cache_entries: int = 128
    max_message_bytes: int = 4 * 1024 * 1024
    grace_seconds: float = 5.0
    metrics_port: int = 0  # Prometheus /metrics on this port; 0 = off
    hybrid: bool = True  # serve the hybrid ranker when the model directory has one
    incremental_events: bool = True  # LogEvents: incremental rows (false: recompute, slow)
    # LogEvents: how many accepted client event_ids are remembered (the newest; refilled from
    # the event log at start): a retry within them is dropped. About 100 bytes an id.
    event_id_window: int = 100_000
    # LogEvents: events in one journal segment before it is compacted into a Parquet file of
    # the event log (avrec/event_journal.py); each call appends one record to the open one
    event_journal_events: int = 10_000
    tls_cert: str | None = None
    tls_key: str | None = None
    auth_token: str | None = None  # bearer token every call must carry (health excepted)
    auth_token_file: str | None = None
    write_token: str | None = None  # when set, LogEvents needs this one (it also reads)
    write_token_file: str | None = None

    def clock_start(self) -> datetime | None:
        """The replay clock's first instant (UTC), or None for the wall clock."""
        if not self.clock:
            return None
        start = datetime.fromisoformat(self.clock.replace("Z", "+00:00"))
        return start if start.tzinfo else start.replace(tzinfo=UTC)

    def scoring_slots(self) -> int:
        """How many requests may score at once (``compute_slots``; 0: one per usable CPU)."""
        return self.compute_slots or usable_cpus()

    def token(self) -> str | None:
        """The bearer token, from ``auth_token`` or the file ``auth_token_file``."""
        return _secret(self.auth_token, self.auth_token_file)

    def write_secret(self) -> str | None:
        """The token LogEvents needs, from ``write_token`` or the file ``write_token_file``."""
        return _secret(self.write_token, self.write_token_file)

    def problems(self) -> list[str]:
        """Settings that cannot work together."""
        found = []
        if bool(self.tls_cert) != bool(self.tls_key):
            found.append("tls_cert and tls_key go together")
        for name in ("max_candidates", "max_top_k", "retrieval_candidates", "workers",
                     "max_message_bytes", "event_id_window", "event_journal_events"):
            if getattr(self, name) <= 0:
                found.append(f"{name} must be positive")
        if self.user_cache_entries < 0:
            found.append("user_cache_entries must be >= 0 (0: no cache)")
        if self.grpc_server not in GRPC_SERVERS:
            found.append(f"grpc_server must be one of {', '.join(GRPC_SERVERS)}")
        if self.compute_slots < 0:
            found.append("compute_slots must be >= 0 (0: one per CPU)")
        if self.clock:
            try:
                self.clock_start()
            except ValueError as exc:
                found.append(f"clock: {exc}")
        return found


def _coerce(field: dataclasses.Field, text: Any) -> Any:
    if text is None or not isinstance(text, str):
        return text
    kind = field.type if isinstance(field.type, str) else field.type.__name__
    if kind.startswith("bool"):
        if text.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{field.name}: expected true or false, got {text!r}")
        return text.strip().lower() in ("true", "1", "yes")
    if kind.startswith("int"):
        return int(text)
    if kind.startswith("float"):
        return float(text)
    return text


def load_config(
    path: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ServeConfig:
    """Defaults < YAML file < ``AVREC_SERVE_<NAME>`` environment < ``overrides`` (non-None)."""
    known = {f.name: f for f in fields(ServeConfig)}
    values: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        unknown = sorted(set(loaded) - set(known))
        if unknown:
            raise ValueError(f"{path}: unknown settings {unknown}; known: {sorted(known)}")
        values |= loaded
    environ = os.environ if environ is None else environ
    for name in known:
        if f"{ENV_PREFIX}{name.upper()}" in environ:
            values[name] = environ[f"{ENV_PREFIX}{name.upper()}"]
    values |= {k: v for k, v in (overrides or {}).items() if v is not None}
    config = ServeConfig(**{k: _coerce(known[k], v) for k, v in values.items()})
    problems = config.problems()
    if problems:
        raise ValueError("serve config: " + "; ".join(problems))
    return config


def _secret(value: str | None, file: str | None) -> str | None:
    return Path(file).read_text().strip() if file else value
