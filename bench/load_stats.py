"""The figures of ``bench/load_gen.py``: the measured calls of a load point, their summary
(achieved rate, latency percentiles, errors, send lag) and the markdown table rows."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from load_schedule import METHODS


@dataclass
class Calls:
    """Measured calls of one load point (warm-up already excluded)."""

    method: list[str] = field(default_factory=list)
    code: list[str] = field(default_factory=list)
    scheduled: list[float] = field(default_factory=list)  # s after the window start
    latency: list[float] = field(default_factory=list)  # s, from the scheduled time
    lag: list[float] = field(default_factory=list)  # s, send time - scheduled time

    def extend(self, other: Calls) -> None:
        for name in ("method", "code", "scheduled", "latency", "lag"):
            getattr(self, name).extend(getattr(other, name))


def summarize(calls: Calls, method: str | None = None) -> dict:
    """Count, achieved rate, percentiles (ms), errors and send lag of ``calls`` (one method or
    all). The achieved rate is the calls answered OK over the time from the window start to
    the last answer (errors count in the percentiles, not in the rate)."""
    keep = [i for i, m in enumerate(calls.method) if method is None or m == method]
    latency = np.array([calls.latency[i] for i in keep]) * 1e3
    done = [calls.scheduled[i] + calls.latency[i] for i in keep]
    errors = Counter(calls.code[i] for i in keep if calls.code[i] != "OK")
    ok = len(keep) - sum(errors.values())
    out = {"calls": len(keep), "ok": ok, "errors": dict(sorted(errors.items()))}
    if not keep:
        return {**out, "achieved": 0.0, "p50": math.nan, "p90": math.nan, "p99": math.nan,
                "max": math.nan, "lag_p99": math.nan}
    p50, p90, p99 = np.percentile(latency, [50, 90, 99])
    lag = np.array([calls.lag[i] for i in keep]) * 1e3
    return {**out, "achieved": ok / max(max(done), 1e-9), "p50": float(p50),
            "p90": float(p90), "p99": float(p99), "max": float(latency.max()),
            "lag_p99": float(np.percentile(lag, 99))}


def error_text(errors: dict[str, int]) -> str:
    """``UNAVAILABLE 3, DEADLINE_EXCEEDED 1``, or ``0``."""
    return ", ".join(f"{code} {n}" for code, n in errors.items()) or "0"


HEADER = ("| load | offered req/s | achieved OK req/s | method | calls | p50 ms | p90 ms | p99 ms "
          "| max ms | errors | send lag p99 ms | client CPU % | server CPU % "
          "| server CPU ms/call | load avg "
          "| feast-sdk p50 / p50 |")


def table_row(point: dict, stats: dict, method: str, feast_p50: float | None) -> str:
    """One markdown row; CPU as % of one core over the window (may exceed 100)."""
    offered = "-" if point["mode"] == "closed" else f"{point['level']:g}"
    load = (f"closed {point['level']:g}" if point["mode"] == "closed"
            else f"open {point['schedule']}")
    if point.get("path", "avrec") != "avrec":
        load = f"{point['path']}, {load}"
    ratio = (f"{feast_p50 / stats['p50']:.1f}x"
             if feast_p50 and method == "rank" and stats["calls"] else "")
    return (f"| {load} | {offered} | {stats['achieved']:.1f} | {method} | {stats['calls']} "
            f"| {stats['p50']:.2f} | {stats['p90']:.2f} | {stats['p99']:.2f} "
            f"| {stats['max']:.1f} | {error_text(stats['errors'])} | {stats['lag_p99']:.2f} "
            f"| {point['client_cpu']:.0f} | {point['server_cpu']:.0f} "
            f"| {point['server_ms_per_call']:.1f} | {point['loadavg']:.2f} "
            f"| {ratio} |")


def rows(point: dict, calls: Calls, mix: tuple[float, ...], feast_p50: float | None) -> list[str]:
    """The table rows of one point: one per method of the mix, and 'all' when several."""
    methods = [m for m, w in zip(METHODS, mix, strict=True) if w > 0]
    out = [table_row(point, summarize(calls, m), m, feast_p50) for m in methods]
    if len(methods) > 1:
        out.append(table_row(point, summarize(calls), "all", None))
    return out
