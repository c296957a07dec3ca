"""Online feature reads that enforce each feature view's TTL.

Feast's Redis store keeps, next to every entity's feature values, the event timestamp of
the row they came from (hash field ``_ts:<view>``), but its reads return values of any age:
an 8-day-old row is served under a 2-day TTL. This reader returns that timestamp with the
values and nulls every feature of a view whose row is older than the view's TTL at ``now``.

``now`` is the reader's clock: wall-clock time for live traffic, or a fixed instant when
replaying a historical dataset (MovieLens ends in 2018).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import polars as pl

from avrec.errors import AvrecError
from avrec.names import ITEM_EMBEDDING

if TYPE_CHECKING:
    from feast import FeatureStore, FeatureView


def _entity_keys(view: FeatureView, ids: list[int]):
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    (join_key,) = [c.name for c in view.entity_columns]
    return join_key, [
        EntityKey(join_keys=[join_key], entity_values=[Value(int64_val=i)]) for i in ids
    ]


def _present(event_ts: datetime | None, values: dict | None) -> bool:
    """Feast answers a missing entity with an epoch timestamp and empty values."""
    if event_ts is None or values is None:
        return False
    return event_ts.timestamp() != 0 or any(v.WhichOneof("val") for v in values.values())


def is_fresh(event_ts: datetime | None, view: FeatureView, now: datetime) -> bool:
    """True when a row stamped ``event_ts`` is still within the view's TTL at ``now``."""
    if event_ts is None:
        return False
    if not view.ttl:
        return True
    return now - event_ts <= view.ttl


def read_view(
    store: FeatureStore, view_name: str, ids: list[int], now: datetime | None = None
) -> pl.DataFrame:
    """One view's features for entity ``ids`` as of ``now``, TTL enforced.

    Columns: the join key, ``event_timestamp`` (of the stored row, null when absent),
    ``fresh`` (row present and within TTL) and one column per feature (null unless fresh).
    """
    from feast.type_map import feast_value_type_to_python_type

    now = now or datetime.now(UTC)
    view = store.get_feature_view(view_name)
    join_key, keys = _entity_keys(view, ids)
    names = [f.name for f in view.features]
    rows = store._get_provider().online_read(
        config=store.config, table=view, entity_keys=keys, requested_features=list(names)
    )
    records: list[dict[str, Any]] = []
    for entity_id, (event_ts, values) in zip(ids, rows, strict=True):
        present = _present(event_ts, values)
        event_ts = event_ts.astimezone(UTC) if present else None
        fresh = present and is_fresh(event_ts, view, now)
        record: dict[str, Any] = {join_key: entity_id, "event_timestamp": event_ts, "fresh": fresh}
        for name in names:
            value = values.get(name) if fresh and values else None
            record[name] = feast_value_type_to_python_type(value) if value is not None else None
        records.append(record)
    return pl.DataFrame(records, infer_schema_length=None)


class MixedVersionsError(AvrecError, RuntimeError):
    """An answer would combine item vectors of two embedding versions."""


def read_item_embeddings(
    store: FeatureStore, ids: list[int], now: datetime | None = None
) -> pl.DataFrame:
    """Fresh item embeddings for ``ids``, all of one ``embedding_version``.

    During a re-materialization Redis briefly holds rows of the old and the new version;
    an answer mixing them would compare vectors from two different spaces, so it is refused
    (the caller retries, or serves from its cached version).
    """
    frame = read_view(store, ITEM_EMBEDDING, ids, now)
    versions = frame.filter(pl.col("fresh"))["embedding_version"].unique().to_list()
    if len(versions) > 1:
        raise MixedVersionsError(f"item embeddings of several versions in one answer: {versions}")
    return frame
