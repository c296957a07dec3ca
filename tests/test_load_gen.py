"""bench/load_gen.py's pure parts (load_schedule.py, load_stats.py): arrival schedules, the
mix, caller split and the summary."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import load_schedule
import load_stats


def test_poisson_schedule_has_the_rate_and_exponential_gaps():
    times = load_schedule.arrivals(200.0, 50.0, "poisson", seed=1)
    assert np.all(np.diff(times) >= 0) and times[0] >= 0 and times[-1] < 50.0
    assert abs(len(times) / 50.0 - 200.0) < 200.0 * 0.03  # 10,000 expected, sd 100
    gaps = np.diff(times)
    assert abs(gaps.mean() - 1 / 200) < 0.03 / 200
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.05  # exponential: cv 1
    assert np.array_equal(times, load_schedule.arrivals(200.0, 50.0, "poisson", seed=1))
    other = load_schedule.arrivals(200.0, 50.0, "poisson", seed=2)
    assert not np.array_equal(times[:50], other[:50])


def test_uniform_schedule_is_evenly_spaced_and_phases_interleave():
    a = load_schedule.arrivals(10.0, 2.0, "uniform", seed=0, phase=0.0)
    b = load_schedule.arrivals(10.0, 2.0, "uniform", seed=0, phase=0.5)
    assert len(a) == len(b) == 20
    assert np.allclose(np.diff(a), 0.1) and a[0] == 0.0
    assert np.allclose(b - a, 0.05)
    merged = np.sort(np.concatenate([a, b]))
    assert np.allclose(np.diff(merged), 0.05)


def test_schedule_edge_cases():
    assert load_schedule.arrivals(0.0, 10.0, "poisson", 0).size == 0
    assert load_schedule.arrivals(5.0, 0.0, "uniform", 0).size == 0
    assert load_schedule.arrivals(1000.0, 0.01, "poisson", 3).max(initial=0.0) < 0.01
    with pytest.raises(ValueError, match="schedule"):
        load_schedule.arrivals(1.0, 1.0, "bursty", 0)


def test_parse_mix():
    assert load_schedule.parse_mix("rank") == (1.0, 0.0, 0.0)
    assert load_schedule.parse_mix("rank=0.7,recommend=0.2,logevents=0.1") == pytest.approx(
        (0.7, 0.2, 0.1))
    assert load_schedule.parse_mix("Rank=2, LogEvents=2") == (0.5, 0.0, 0.5)
    with pytest.raises(ValueError, match="unknown method"):
        load_schedule.parse_mix("rank,search")
    with pytest.raises(ValueError, match="weights"):
        load_schedule.parse_mix("rank=0")


def test_split_callers_over_processes():
    assert load_schedule.split(4, 2) == [2, 2]
    assert load_schedule.split(5, 2) == [3, 2]
    assert load_schedule.split(1, 4) == [1]
    assert sum(load_schedule.split(13, 4)) == 13


def calls(rows):
    c = load_stats.Calls()
    for method, code, scheduled, latency, lag in rows:
        c.method.append(method)
        c.code.append(code)
        c.scheduled.append(scheduled)
        c.latency.append(latency)
        c.lag.append(lag)
    return c


def test_summary_percentiles_rate_and_errors():
    # 100 rank calls scheduled over 10 s, latencies 1..100 ms; two errors; one recommend
    rows = [("rank", "OK", i * 0.1, (i + 1) / 1000, 0.0) for i in range(100)]
    rows[3] = ("rank", "DEADLINE_EXCEEDED", 0.3, 0.004, 0.0)
    rows[4] = ("rank", "UNAVAILABLE", 0.4, 0.005, 0.002)
    rows.append(("recommend", "OK", 5.0, 0.5, 0.0))
    c = calls(rows)
    rank = load_stats.summarize(c, "rank")
    assert rank["calls"] == 100
    assert rank["p50"] == pytest.approx(np.percentile(np.arange(1, 101), 50))
    assert rank["p99"] == pytest.approx(np.percentile(np.arange(1, 101), 99))
    assert rank["max"] == pytest.approx(100.0)
    assert rank["errors"] == {"DEADLINE_EXCEEDED": 1, "UNAVAILABLE": 1}
    # 98 answered OK, the last answer at 9.9 s + 0.1 s = 10.0 s after the window start
    assert rank["ok"] == 98 and rank["achieved"] == pytest.approx(9.8)
    assert load_stats.error_text(rank["errors"]) == "DEADLINE_EXCEEDED 1, UNAVAILABLE 1"
    everything = load_stats.summarize(c)
    assert everything["calls"] == 101 and everything["max"] == pytest.approx(500.0)


def test_summary_counts_queueing_in_the_achieved_rate():
    # a server that falls behind: 50 calls scheduled in 1 s, the last answered at 5 s
    rows = [("rank", "OK", i / 50, 5.0 - i / 50, 0.0) for i in range(50)]
    stats = load_stats.summarize(calls(rows))
    assert stats["achieved"] == pytest.approx(10.0)
    assert stats["max"] == pytest.approx(5000.0)


def test_empty_summary_and_table_row():
    stats = load_stats.summarize(load_stats.Calls(), "rank")
    assert stats["calls"] == 0 and math.isnan(stats["p50"])
    point = {"mode": "open", "level": 100.0, "schedule": "poisson", "client_cpu": 12.0,
             "server_cpu": 150.0, "server_ms_per_call": 15.0, "loadavg": 2.5}
    rows = [("rank", "OK", i * 0.01, 0.01, 0.001) for i in range(100)]
    row = load_stats.table_row(point, load_stats.summarize(calls(rows), "rank"), "rank", 50.0)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == load_stats.HEADER.count("|") - 1
    assert cells[:4] == ["open poisson", "100", "100.0", "rank"]
    assert cells[-1] == "5.0x"  # feast-sdk p50 50 ms / 10 ms


def test_feast_row_is_labelled():
    point = {"path": "feast-sdk", "mode": "closed", "level": 1.0, "schedule": "poisson",
             "client_cpu": 1.0, "server_cpu": 90.0, "server_ms_per_call": 45.0, "loadavg": 1.0}
    rows = [("rank", "OK", i * 0.05, 0.05, 0.0) for i in range(20)]
    row = load_stats.table_row(point, load_stats.summarize(calls(rows), "rank"), "rank", None)
    assert row.startswith("| feast-sdk, closed 1 | - |")
