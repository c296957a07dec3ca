"""The catalogue held in process: item behaviour, item vectors and titles, loaded from Redis.

Rank requests read only the user's row from Redis; every candidate's features come from an
:class:`ItemSnapshot`, a consistent copy of the ``item_behaviour`` and ``item_embedding`` rows of
the whole catalogue taken in one pipelined pass. A snapshot is replaced when

* the materialization counter (``avrec.feature_store.materialization_key``, read in the same
  round trip as the user's row) changes: a materialization wrote new rows;
* its ``valid_until`` passes: the refresh interval (catching writes that bypassed
  ``avrec materialize``, e.g. a bare ``feast materialize``) or the first item row to outlive
  its view's TTL (``expires_at``), so an expired row is never served from memory.

A snapshot whose vectors mix two embedding versions is refused
(:class:`avrec.online_features.MixedVersionsError`); the server keeps the one it has.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from avrec.names import DAY_US, ITEM_BEHAVIOUR, ITEM_EMBEDDING
from avrec.online_features import MixedVersionsError
from avrec.pit_join import DERIVED_AGES
from avrec.ranker.features import lookup_rows
from avrec.server.feature_reader import OnlineRow, ViewReader

if TYPE_CHECKING:
    from avrec.ranker.features import FeatureEncoder
    from avrec.redis_client import Client

BEHAVIOUR_VIEW = ITEM_BEHAVIOUR
EMBEDDING_VIEW = ITEM_EMBEDDING
AGE = "item_age_days"
PIPELINE_CHUNK = 250  # items per pipelined read; a reload pauses between chunks
YIELD_SECONDS = 0.002  # the pause: requests run meanwhile without sharing the interpreter


def age_days(now: datetime, stamps: Sequence[datetime | None]) -> list[float | None]:
    """Days from each stamp to ``now`` (None stays None), as the training sets derive ages."""
    out: list[float | None] = []
    for stamp in stamps:
        if stamp is None:
            out.append(None)
            continue
        delta = now - stamp
        micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
        out.append(micros / DAY_US)
    return out


@dataclass
class ItemSnapshot:
    """Every catalogue item's serving inputs as of ``loaded_at``; row ``i`` is ``item_ids[i]``."""

    item_ids: np.ndarray
    titles: list[str]
    vectors: np.ndarray
    has_vector: np.ndarray
    dense: np.ndarray
    missing: np.ndarray
    popularity: np.ndarray
    frame: pl.DataFrame
    embedding_version: str | None
    materialization: bytes | None
    loaded_at: datetime
    valid_until: datetime
    expires_at: datetime | None = None  # the first row to outlive its TTL (None: none will)
    freshest: dict[str, datetime | None] = field(default_factory=dict)
    _order: np.ndarray = field(init=False, repr=False)
    _sorted_ids: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._order = np.argsort(self.item_ids, kind="stable")
        self._sorted_ids = self.item_ids[self._order]

    def __len__(self) -> int:
        return int(self.item_ids.size)

    def rows(self, item_ids: np.ndarray) -> np.ndarray:
        """Row of each id, -1 for ids outside the catalogue."""
        return lookup_rows(self.item_ids, self._order, item_ids, self._sorted_ids)

    def dense_for(self, encoder: FeatureEncoder) -> np.ndarray:
        """Item dense inputs under another model's encoder (e.g. the item tower's)."""
        flag = (~self.has_vector).astype(np.float32)[:, None]
        return np.concatenate([encoder.item_dense(self.frame), flag], 1).astype(np.float32)

    def unit_vectors(self) -> np.ndarray:
        """L2-normalised item vectors (zeros where an item has none)."""
        norms = np.linalg.norm(self.vectors, axis=1, keepdims=True)
        return self.vectors / np.maximum(norms, 1e-12)


class RowCache:
    """The catalogue's rows of one view as last read, so that a reload parses only the rows
    whose bytes changed.

    A snapshot reload reads every item's hash; parsing them all again (~100,000 protobuf
    values for 9,742 items, 0.7 s of Python) held the interpreter long enough to stall the
    requests served meanwhile. Between two reloads most rows are byte for byte the same (the
    embeddings always, behaviour rows until their item is rated), so each row's parse is kept
    with the raw reply it came from and reused while the reply stays equal; whether a row is
    served (TTL, a replay clock behind it) is decided again at every read. The hash keys are
    computed once per item, too.

    A background reload reads in small chunks and sleeps a little after each: while it runs,
    every request that gives up the interpreter (a Redis call, many numpy calls) waits up to
    the switch interval to get it back, and a 1x200 ``Rank`` took up to 78 ms during one
    read of the behaviour rows; during the pauses requests run alone.
    """

    def __init__(self, reader: ViewReader) -> None:
        self.reader = reader
        self._keys: dict[int, bytes] = {}
        self._parsed: dict[int, tuple[tuple[bytes | None, ...], Any]] = {}
        self.parsed = 0  # rows parsed by the last read (the others were reused)

    def read(self, client: Client, ids: np.ndarray, now: datetime, pause: float = 0.0
             ) -> list[OnlineRow]:
        """Every row of ``ids`` as served at ``now`` (pipelined, in chunks, sleeping
        ``pause`` seconds after each)."""
        reader, keys, parsed = self.reader, self._keys, self._parsed
        rows: list[OnlineRow] = []
        self.parsed = 0
        for start in range(0, len(ids), PIPELINE_CHUNK):
            chunk = [int(i) for i in ids[start : start + PIPELINE_CHUNK]]
            with client.pipeline(transaction=False) as pipe:
                for entity_id in chunk:
                    key = keys.get(entity_id)
                    if key is None:
                        key = keys[entity_id] = reader.key(entity_id)
                    pipe.hmget(key, reader.fields)
                replies = pipe.execute()
            for entity_id, reply in zip(chunk, replies, strict=True):
                raw = tuple(reply)
                seen = parsed.get(entity_id)
                if seen is None or seen[0] != raw:
                    event_ts, values = reader.parse(raw)
                    seen = parsed[entity_id] = (raw, (event_ts, compact(values)))
                    self.parsed += 1
                rows.append(reader.row_at(entity_id, *seen[1], now))
            _rest(pause)
        return rows


def compact(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with each list of floats as a float32 array (the Feast type of every float
    list here): kept for the whole catalogue, a Python list costs 32 bytes a float, the
    array 4 (the item embeddings' cache: 110 -> 24-26 MB for 9,742 items x 2 x 128).

    >>> compact({"embedding": [0.5, 0.25], "ids": [1, 2], "n": 3})
    {'embedding': array([0.5 , 0.25], dtype=float32), 'ids': [1, 2], 'n': 3}
    """
    return {name: np.asarray(value, dtype=np.float32)
            if isinstance(value, list) and value and isinstance(value[0], float) else value
            for name, value in values.items()}


def _expiry(rows: list[OnlineRow], ttl: timedelta | None) -> datetime | None:
    stamps = [r.event_timestamp for r in rows if r.fresh and r.event_timestamp is not None]
    if ttl is None or not stamps:
        return None
    return min(stamps) + ttl


def _rest(pause: float) -> None:
    """Sleep ``pause`` seconds (0: not at all): requests run meanwhile."""
    if pause:
        time.sleep(pause)


def _pause_every(i: int, pause: float) -> None:
    """:func:`_rest` after every :data:`PIPELINE_CHUNK`-th step ``i``."""
    if i % PIPELINE_CHUNK == PIPELINE_CHUNK - 1:
        _rest(pause)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
UTC_MICROS = pl.Datetime("us", "UTC")  # Feast's timestamps as frame columns


def _column(name: str, values: list[Any], pause: float = 0.0) -> pl.Series:
    """One frame column from Python values.

    UTC datetimes (Feast's timestamps) go through integer microseconds, converted in chunks
    with ``pause`` after each: polars converts datetime objects in one call that held the
    interpreter for 20-38 ms per 9,742 items (every request in flight waited). Anything else,
    naive or other-zone datetimes included, is polars' own conversion.

    >>> _column("t", [None, datetime(2000, 1, 1, tzinfo=UTC)]).to_list()[1].year
    2000
    """
    micros: list[int | None] = []
    for i, value in enumerate(values):
        if value is None:
            micros.append(None)
        elif isinstance(value, datetime) and value.tzinfo is UTC:
            micros.append((value - _EPOCH) // _MICROSECOND)
        else:
            return pl.Series(name, values, strict=False)
        _pause_every(i, pause)
    if all(m is None for m in micros):
        return pl.Series(name, values, strict=False)
    return pl.Series(name, micros, dtype=pl.Int64).cast(UTC_MICROS)


def item_frame(reader: ViewReader, rows: list[OnlineRow], now: datetime,
               pause: float = 0.0) -> pl.DataFrame:
    """Item behaviour rows as training-set columns (``item_behaviour__*`` + derived age);
    ``pause``: seconds to sleep after each chunk of rows and each column (a background
    reload)."""
    records: dict[str, list[Any]] = {f"{reader.view}__{f}": [] for f in reader.features}
    for i, row in enumerate(rows):
        for name, value in reader.prefixed(row).items():
            records[name].append(value)
        _pause_every(i, pause)
    # one column at a time: each conversion of Python values holds the interpreter, and one
    # call over every column held it for ~40 ms of a reload (requests waited meanwhile)
    columns = []
    for name, values in records.items():
        columns.append(_column(name, values, pause))
        _rest(pause)
    frame = pl.DataFrame(columns)
    first = DERIVED_AGES[AGE]
    if first not in frame.columns or frame.schema[first] != UTC_MICROS:
        stamps = frame[first].to_list() if first in frame.columns else [None] * frame.height
        return frame.with_columns(pl.Series(AGE, age_days(now, stamps), dtype=pl.Float64))
    # :func:`age_days` without a Python datetime per row (numpy's division is Python's:
    # both exact in float64; polars' differs in the last bit)
    micros = frame.select(
        (pl.lit(now).cast(UTC_MICROS) - pl.col(first)).dt.total_microseconds()).to_series()
    ages = micros.cast(pl.Float64).to_numpy() / DAY_US
    return frame.with_columns(pl.Series(AGE, ages, dtype=pl.Float64, nan_to_null=True))


def load_snapshot(
    client: Client,
    behaviour: ViewReader,
    embedding: ViewReader,
    catalogue: pl.DataFrame,
    encoder: FeatureEncoder,
    now: datetime,
    refresh: timedelta,
    vector_field: str = "embedding",
    materialization: bytes | None = None,
    caches: tuple[RowCache, RowCache] | None = None,
    pause: float = 0.0,
) -> ItemSnapshot:
    """Read the whole catalogue's item rows from Redis (pipelined) into an :class:`ItemSnapshot`.

    ``catalogue``: ``item_id`` and ``title`` of every servable item (the offline items table).
    Item dense features are encoded with the model's own :class:`FeatureEncoder`, plus the
    ``item_has_no_vector`` flag, exactly as in training. ``caches``: the behaviour and
    embedding :class:`RowCache` of earlier loads (default: fresh ones, every row parsed);
    ``pause``: seconds to sleep after each pipelined chunk (a background reload).
    """
    ids = catalogue["item_id"].to_numpy().astype(np.int64)
    behaviour_cache, embedding_cache = caches or (RowCache(behaviour), RowCache(embedding))
    behaviour_rows = behaviour_cache.read(client, ids, now, pause)
    embedding_rows = embedding_cache.read(client, ids, now, pause)
    versions = {r.values.get("embedding_version") for r in embedding_rows if r.fresh}
    versions.discard(None)
    if len(versions) > 1:
        raise MixedVersionsError(f"item embeddings of several versions online: {sorted(versions)}")
    vectors_list = [r.values.get(vector_field) if r.fresh else None for r in embedding_rows]
    dim = next((len(v) for v in vectors_list if v is not None and len(v)), 0)
    vectors = np.zeros((len(ids), dim), dtype=np.float32)
    has_vector = np.zeros(len(ids), dtype=bool)
    for i, vector in enumerate(vectors_list):
        if vector is not None and len(vector):
            vectors[i], has_vector[i] = vector, True
        _pause_every(i, pause)
    frame = item_frame(behaviour, behaviour_rows, now, pause)
    fresh_behaviour = np.array([r.fresh for r in behaviour_rows], dtype=bool)
    expiries = [
        e for e in (_expiry(behaviour_rows, behaviour.ttl), _expiry(embedding_rows, embedding.ttl))
        if e is not None
    ]
    freshest = {
        view: max((r.event_timestamp for r in rows if r.fresh), default=None)
        for view, rows in ((behaviour.view, behaviour_rows), (embedding.view, embedding_rows))
    }
    snapshot = ItemSnapshot(
        item_ids=ids,
        titles=[t or "" for t in catalogue["title"].to_list()],
        vectors=vectors,
        has_vector=has_vector,
        dense=np.empty((len(ids), 0), np.float32),
        missing=~(fresh_behaviour & has_vector),
        popularity=frame[f"{behaviour.view}__popularity_all"].fill_null(0).to_numpy(),
        frame=frame,
        embedding_version=next(iter(versions), None),
        materialization=materialization,
        loaded_at=now,
        valid_until=min([now + refresh, *expiries]),
        expires_at=min(expiries, default=None),
        freshest=freshest,
    )
    snapshot.dense = snapshot.dense_for(encoder)
    return snapshot
