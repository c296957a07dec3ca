"""``LogEvents``: validate user events, append them offline, update the users' online rows now.

Accepted events are appended as one Parquet file per call under ``offline/event_log/`` (the
events schema of :mod:`avrec.tables`; ``avrec features`` folds them into the behaviour tables
for later training). Each touched user's ``user_behaviour`` row is then recomputed from that
user's whole history (offline events + logged ones) with the same code that builds the offline
table (:func:`avrec.behaviour_features.user_features`), and the latest row as of ``now`` is
written to Redis through Feast's ``write_to_online_store``, so the next ``Rank`` sees it; so
is the user's ``user_history`` row (:func:`avrec.behaviour_features.user_history`).
"""

from __future__ import annotations

import math
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from avrec import behaviour_features, tables

if TYPE_CHECKING:
    from feast import FeatureStore

EVENT_TYPES = ("rating", "tag")
RATING_RANGE = (0.5, 5.0)
USER_VIEW = "user_behaviour"
HISTORY_VIEW = "user_history"


class EventError(ValueError):
    """An event batch that cannot be accepted; nothing of it was written."""


@dataclass(frozen=True)
class LoggedEvent:
    """One event as received (``rating`` only for ratings; ``timestamp`` None = now)."""

    user_id: int
    item_id: int
    event_type: str
    rating: float | None
    timestamp: datetime | None


@dataclass(frozen=True)
class LogResult:
    accepted: int
    users: list[int]
    path: Path


class EventLog:
    """The offline history the server updates users from, plus the events logged since start."""

    def __init__(self, offline: Path, catalogue_ids: np.ndarray) -> None:
        self.offline = offline
        self.items = tables.read_table("items", offline)
        self.genres = behaviour_features.genre_vocabulary(self.items)
        self.events = tables.read_events(offline)
        self.catalogue = set(int(i) for i in catalogue_ids)
        self._lock = threading.Lock()

    def validate(self, events: Sequence[LoggedEvent], now: datetime) -> pl.DataFrame:
        """The batch as an events frame, or :class:`EventError` naming the first bad event."""
        if not events:
            raise EventError("no events in the request")
        rows = []
        for i, event in enumerate(events):
            where = f"event {i} (user {event.user_id}, item {event.item_id})"
            if event.user_id <= 0 or event.item_id <= 0:
                raise EventError(f"{where}: ids must be positive")
            if event.item_id not in self.catalogue:
                raise EventError(f"{where}: item {event.item_id} is not in the catalogue")
            if event.event_type not in EVENT_TYPES:
                raise EventError(f"{where}: event_type {event.event_type!r} not in {EVENT_TYPES}")
            value = None
            if event.event_type == "rating":
                value = event.rating
                low, high = RATING_RANGE
                if value is None or not math.isfinite(value) or not low <= value <= high:
                    raise EventError(f"{where}: rating {value} outside [{low}, {high}]")
            stamp = event.timestamp or now
            if stamp > now:
                raise EventError(f"{where}: timestamp {stamp.isoformat()} is after the server "
                                 f"clock {now.isoformat()}")
            rows.append((event.user_id, event.item_id, event.event_type, value, stamp))
        return pl.DataFrame(rows, schema=tables.EVENTS_SCHEMA, orient="row")

    def append(self, frame: pl.DataFrame, now: datetime) -> Path:
        """Write the batch under ``offline/event_log/`` and keep it in memory."""
        directory = self.offline / tables.EVENT_LOG
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{now:%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = path.with_suffix(".tmp")
        frame.write_parquet(tmp)
        tmp.replace(path)
        self.events = pl.concat([self.events, frame], how="vertical_relaxed")
        return path

    def user_rows(self, user_ids: list[int], now: datetime) -> pl.DataFrame:
        """Each user's latest ``user_behaviour`` row as of ``now``, from their whole history."""
        history = self.events.filter(pl.col("user_id").is_in(user_ids))
        rows = behaviour_features.user_features(history, self.items, self.genres, now, now)
        return (
            rows.filter(pl.col("event_timestamp") <= now)
            .sort("event_timestamp")
            .group_by("user_id", maintain_order=True)
            .last()
        )

    def history_rows(self, user_ids: list[int], now: datetime) -> pl.DataFrame:
        """Each user's ``user_history`` row as of ``now`` (users without ratings: none)."""
        events = self.events.filter(pl.col("user_id").is_in(user_ids))
        return behaviour_features.user_history(events, now, now)

    def log(self, store: FeatureStore, events: Sequence[LoggedEvent], now: datetime) -> LogResult:
        """Validate, append offline, then write the touched users' rows online."""
        frame = self.validate(events, now)
        with self._lock:
            path = self.append(frame, now)
            users = sorted(set(frame["user_id"].to_list()))
            rows = self.user_rows(users, now)
            histories = self.history_rows(users, now)
        store.write_to_online_store(USER_VIEW, rows.to_pandas(use_pyarrow_extension_array=False))
        if histories.height and HISTORY_VIEW in {v.name for v in store.list_feature_views()}:
            store.write_to_online_store(
                HISTORY_VIEW, histories.to_pandas(use_pyarrow_extension_array=False))
        return LogResult(frame.height, users, path)

