"""Prometheus metrics of the ranking service (exposed by ``avrec serve --metrics-port``).

* ``avrec_request_seconds{method}``: latency histogram per RPC,
* ``avrec_requests_total{method, code}``: calls by gRPC status code,
* ``avrec_item_snapshot_total{result}``: snapshot lookups (``hit``; ``stale``: served while
  a background reload runs) and reloads (``reload``; ``failed``: a background reload that
  failed, the old snapshot kept serving),
* ``avrec_item_snapshot_age_seconds``: how old the served item snapshot is,
* ``avrec_model_swaps_total{result}``: model hot swaps (``swapped``; ``refused``: a new run
  that failed its checks, the old model kept serving; :mod:`avrec.server.hot_swap`).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.006, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

REQUEST_SECONDS = Histogram(
    "avrec_request_seconds", "RPC latency in seconds", ["method"], buckets=BUCKETS
)
REQUESTS = Counter("avrec_requests_total", "RPCs by method and status code", ["method", "code"])
SNAPSHOT = Counter("avrec_item_snapshot_total", "Item snapshot hits and reloads", ["result"])
SNAPSHOT_AGE = Gauge("avrec_item_snapshot_age_seconds", "Age of the served item snapshot")
MODEL_SWAPS = Counter("avrec_model_swaps_total", "Model hot swaps, done and refused", ["result"])


def observe(method: str, code: str, seconds: float) -> None:
    """Count one finished call and its latency."""
    REQUESTS.labels(method, code).inc()
    if method != "auth":
        REQUEST_SECONDS.labels(method).observe(seconds)


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """Expose ``/metrics`` over HTTP on ``port``."""
    start_http_server(port, addr=host)
