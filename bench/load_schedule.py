"""What a load point of ``bench/load_gen.py`` sends: the RPC methods and their mix, open-loop
arrival schedules, and callers split over client processes (pure; tests/test_load_gen.py)."""

from __future__ import annotations

import math

import numpy as np

METHODS = ("rank", "recommend", "logevents")
LOAD_USERS = (40_000_000, 40_001_000)  # LogEvents users [lo, hi): no real user has these ids


def arrivals(rate: float, seconds: float, schedule: str, seed: int,
             phase: float = 0.0) -> np.ndarray:
    """Send times (s from the start) of an open-loop schedule of ``rate`` calls/s.

    ``poisson``: exponential gaps of mean 1/rate; ``uniform``: one every 1/rate s, shifted by
    ``phase`` (a fraction of the gap, so several processes interleave)."""
    if rate <= 0 or seconds <= 0:
        return np.zeros(0)
    if schedule == "uniform":
        times = (np.arange(math.ceil(rate * seconds) + 1) + phase % 1.0) / rate
    elif schedule == "poisson":
        rng = np.random.default_rng(seed)
        n = int(rate * seconds + 10 * math.sqrt(rate * seconds) + 10)
        times = np.cumsum(rng.exponential(1.0 / rate, n))
        while times[-1] < seconds:  # never short (vanishingly unlikely)
            times = np.concatenate([times, times[-1] + np.cumsum(rng.exponential(1 / rate, n))])
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return times[times < seconds]


def parse_mix(text: str) -> tuple[float, float, float]:
    """``rank=0.7,recommend=0.2,logevents=0.1`` (or ``rank``) -> weights in METHODS order."""
    weights = dict.fromkeys(METHODS, 0.0)
    for part in text.split(","):
        name, _, value = part.strip().partition("=")
        if name.lower() not in weights:
            raise ValueError(f"unknown method {name!r} in --mix (one of {', '.join(METHODS)})")
        weights[name.lower()] = float(value) if value else 1.0
    total = sum(weights.values())
    if total <= 0 or min(weights.values()) < 0:
        raise ValueError(f"--mix {text!r}: weights must be >= 0 with a positive sum")
    return tuple(weights[m] / total for m in METHODS)  # type: ignore[return-value]


def split(total: int, parts: int) -> list[int]:
    """``total`` callers over ``parts`` processes, as even as possible (no empty process)."""
    parts = max(1, min(parts, total))
    return [total // parts + (i < total % parts) for i in range(parts)]
