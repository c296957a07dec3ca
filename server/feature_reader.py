"""Raw, pipelined reads of Feast's Redis online store, with each view's TTL enforced.

Feast's ``get_online_features`` costs 25-28 ms for one user and 200 items here; the same
hashes read in one redis-py pipeline cost a few. :class:`ViewReader` knows where Feast keeps a
view's values (Feast's own ``_redis_key`` for the hash, ``_mmh3("<view>:<feature>")`` for the
fields, ``_ts:<view>`` for the row's event time) and decodes them with Feast's own
``ValueProto`` and ``feast_value_type_to_python_type`` (:func:`python_value` takes plain numbers,
strings and their lists straight from the message, as that function does): no encoding is
re-implemented here.

A row is served only when it is present and ``0 <= now - event_time <= ttl`` (Feast's Redis
store serves rows of any age, and rows newer than a replay clock); an expired or future row is
reported as such, its values withheld.

Example::

    reader = ViewReader.from_store(store, "user_behaviour")
    with redis_client.pipeline(transaction=False) as pipe:
        reader.queue(pipe, [42])
        (row,) = reader.decode(pipe.execute(), now)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from feast.infra.online_stores.helpers import _mmh3, _redis_key
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Value
from feast.type_map import feast_value_type_to_python_type
from google.protobuf.timestamp_pb2 import Timestamp

if TYPE_CHECKING:
    from feast import FeatureStore
    from redis.client import Pipeline


# Value kinds whose Python value is the field itself, or the list of its ``val``: what
# ``feast_value_type_to_python_type`` returns for them, without its ~25 checks per value.
PLAIN_KINDS = frozenset({"int32_val", "int64_val", "float_val", "double_val", "string_val",
                         "bytes_val", "bool_val"})
PLAIN_LIST_KINDS = frozenset({"int32_list_val", "int64_list_val", "float_list_val",
                              "double_list_val", "string_list_val", "bytes_list_val",
                              "bool_list_val"})
ENTITY_KEYS_CACHED = 65_536  # Redis keys of the most recent entities, per view


def python_value(value: Value) -> Any:
    """``feast_value_type_to_python_type(value)``, plain kinds read directly.

    >>> python_value(Value(int64_list_val={"val": [3, 1]})), python_value(Value(double_val=2.5))
    ([3, 1], 2.5)
    """
    kind = value.WhichOneof("val")
    if kind in PLAIN_KINDS:
        return getattr(value, kind)
    if kind in PLAIN_LIST_KINDS:
        return list(getattr(value, kind).val)
    return feast_value_type_to_python_type(value)


@dataclass(frozen=True)
class OnlineRow:
    """One entity's row of one view as served at ``now``.

    ``values`` is empty unless the row is ``fresh``; ``expired`` marks a row that exists but
    is older than the view's TTL, ``future`` one stamped after ``now`` (a replay clock behind
    the data): neither is served.
    """

    entity_id: int
    event_timestamp: datetime | None
    fresh: bool
    expired: bool
    values: dict[str, Any] = field(default_factory=dict)
    future: bool = False


@dataclass(frozen=True)
class ViewReader:
    """Where and how one feature view's rows live in Redis."""

    view: str
    project: str
    join_key: str
    features: tuple[str, ...]
    ttl: timedelta | None
    key_version: int
    fields: tuple[bytes | str, ...]

    @classmethod
    def from_store(cls, store: FeatureStore, view_name: str) -> ViewReader:
        """Layout of ``view_name`` from the Feast registry and repo config."""
        view = store.get_feature_view(view_name)
        (join_key,) = [c.name for c in view.entity_columns]
        features = tuple(f.name for f in view.features)
        fields = (*(_mmh3(f"{view.name}:{f}") for f in features), f"_ts:{view.name}")
        return cls(
            view=view.name,
            project=store.config.project,
            join_key=join_key,
            features=features,
            ttl=view.ttl or None,
            key_version=store.config.entity_key_serialization_version,
            fields=fields,
        )

    @functools.lru_cache(maxsize=ENTITY_KEYS_CACHED)  # noqa: B019 (readers live as long)
    def key(self, entity_id: int) -> bytes:
        """The Redis hash key Feast writes this entity's rows under."""
        entity = EntityKey(join_keys=[self.join_key], entity_values=[Value(int64_val=entity_id)])
        return _redis_key(self.project, entity, self.key_version)

    def queue(self, pipe: Pipeline, ids: Sequence[int]) -> None:
        """Add one HMGET per entity to ``pipe``."""
        for entity_id in ids:
            pipe.hmget(self.key(int(entity_id)), self.fields)

    def command(self, entity_id: int) -> tuple[bytes | str, ...]:
        """The HMGET of one entity's row as a command (for
        :class:`~avrec.server.in_flight.InFlight`)."""
        return ("HMGET", self.key(int(entity_id)), *self.fields)

    def decode_one(self, entity_id: int, raw: Sequence[bytes | None], now: datetime) -> OnlineRow:
        """One HMGET reply as an :class:`OnlineRow` at ``now``."""
        return self.row_at(entity_id, *self.parse(raw), now)

    def parse(self, raw: Sequence[bytes | None]) -> tuple[datetime | None, dict[str, Any]]:
        """One HMGET reply as (event time, decoded values), whatever the clock; (None, {})
        when the entity has no row."""
        *values, ts_raw = raw
        if ts_raw is None and not any(values):
            return None, {}
        stamp = Timestamp()
        stamp.ParseFromString(ts_raw or b"")
        event_ts = datetime.fromtimestamp(stamp.seconds + stamp.nanos / 1e9, tz=UTC)
        decoded = {}
        for name, blob in zip(self.features, values, strict=True):
            value = Value()
            if blob:
                value.ParseFromString(blob)
            decoded[name] = python_value(value) if blob else None
        return event_ts, decoded

    def row_at(self, entity_id: int, event_ts: datetime | None, values: dict[str, Any],
               now: datetime) -> OnlineRow:
        """A parsed row as served at ``now``: values withheld when expired or in the future."""
        if event_ts is None:
            return OnlineRow(entity_id, None, fresh=False, expired=False)
        if event_ts > now:
            return OnlineRow(entity_id, event_ts, fresh=False, expired=False, future=True)
        if self.ttl is not None and now - event_ts > self.ttl:
            return OnlineRow(entity_id, event_ts, fresh=False, expired=True)
        return OnlineRow(entity_id, event_ts, fresh=True, expired=False, values=values)

    def decode(
        self, ids: Sequence[int], replies: Sequence[Sequence[bytes | None]], now: datetime
    ) -> list[OnlineRow]:
        """The HMGET replies queued by :meth:`queue` for ``ids``, in order."""
        return [self.decode_one(int(i), r, now) for i, r in zip(ids, replies, strict=True)]

    def prefixed(self, row: OnlineRow) -> dict[str, Any]:
        """``{"<view>__<feature>": value}`` as in training sets (None when not fresh)."""
        return {f"{self.view}__{name}": row.values.get(name) for name in self.features}
