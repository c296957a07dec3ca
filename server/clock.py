"""The serving clock: wall-clock UTC, or a replay clock that ticks from a chosen start."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta


class Clock:
    """Wall-clock UTC, or a replay clock that starts at ``start`` and ticks in real time.

    ``anchor``: the wall time (Unix seconds) at which the replay clock read ``start``
    (default: now), so that replicas started one after another keep one replay time."""

    def __init__(self, start: datetime | None = None, anchor: float | None = None) -> None:
        self.start, self._t0 = start, time.monotonic()
        if anchor is not None:
            self._t0 -= time.time() - anchor

    def now(self) -> datetime:
        if self.start is None:
            return datetime.now(UTC)
        return self.start + timedelta(seconds=time.monotonic() - self._t0)
