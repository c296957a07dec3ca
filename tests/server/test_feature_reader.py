"""The raw Redis reader against Feast's own get_online_features, value by value."""

from __future__ import annotations

import math
from datetime import timedelta

import numpy as np
import pytest
import redis
from feast.protos.feast.types.Value_pb2 import Value
from feast.type_map import feast_value_type_to_python_type
from hypothesis import given
from hypothesis import strategies as st

from avrec.redis_client import connect
from avrec.server.feature_reader import ViewReader, python_value
from tests.server.conftest import CLOCK

VIEWS = {"user_behaviour": "user_id", "item_behaviour": "item_id", "item_embedding": "item_id"}


def same(a, b) -> bool:
    if isinstance(a, list | tuple | np.ndarray) or isinstance(b, list | tuple | np.ndarray):
        if a is None or b is None:
            return a is None and b is None
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


@pytest.mark.parametrize("view", sorted(VIEWS))
def test_raw_reads_equal_feast_get_online_features(online_stack, view: str) -> None:
    """On a single Redis and on the Redis Cluster (Feast's cluster client, the server's
    cluster pipeline)."""
    stack = online_stack
    store = stack.store
    key = VIEWS[view]
    ids = list(range(1, 611)) if key == "user_id" else [1, 2, 3, 50, 318, 2571, 193609, 999999]
    ids += [987654321]  # absent
    reader = ViewReader.from_store(store, view)
    client = connect(stack.redis_url)
    with client.pipeline(transaction=False) as pipe:
        reader.queue(pipe, ids)
        # far-future reader clock only for expiry; values are compared at a clock inside TTL
        rows = reader.decode(ids, pipe.execute(), CLOCK)
    refs = [f"{view}:{f}" for f in reader.features]
    feast = store.get_online_features(features=refs, entity_rows=[{key: i} for i in ids]).to_dict()
    compared = expired = future = 0
    for i, row in enumerate(rows):
        for name in reader.features:
            theirs = feast[name][i]
            if row.fresh:
                assert same(row.values[name], theirs), (view, ids[i], name)
                compared += 1
            elif row.expired:
                expired += 1
            elif row.future:  # stamped after CLOCK (another test logged events at its clock)
                assert row.event_timestamp > CLOCK, (view, ids[i])  # Feast serves it anyway
                future += 1
            else:
                assert theirs is None, (view, ids[i], name)  # absent for Feast too
    assert not rows[-1].fresh and not rows[-1].expired  # the absent id
    assert compared > 0
    print(f"{view}: {compared} values equal to Feast's, {expired} withheld as expired, "
          f"{future} as future")


def test_ttl_is_enforced_where_feast_serves_stale_rows(stack) -> None:
    store = stack.store
    reader = ViewReader.from_store(store, "user_behaviour")
    client = redis.Redis.from_url(stack.redis_url)
    ids = list(range(1, 611))
    with client.pipeline(transaction=False) as pipe:
        reader.queue(pipe, ids)
        replies = pipe.execute()
    rows = reader.decode(ids, replies, CLOCK)
    expired = [r for r in rows if r.expired]
    assert expired, "ml-latest-small has users idle for more than the 730-day TTL"
    for row in expired:
        assert CLOCK - row.event_timestamp > timedelta(days=730)
        assert row.values == {}
    refs = ["user_behaviour:interactions_all"]
    feast = store.get_online_features(
        features=refs, entity_rows=[{"user_id": r.entity_id} for r in expired]
    ).to_dict()
    assert all(v is not None for v in feast["interactions_all"]), "Feast serves expired rows"
    fresh = [r for r in rows if r.fresh]
    assert all(CLOCK - r.event_timestamp <= timedelta(days=730) for r in fresh)
    # the same rows read one TTL later are all expired
    later = reader.decode(ids, replies, CLOCK + timedelta(days=731))
    assert not any(r.fresh for r in later)


def test_rows_after_the_clock_are_not_served(stack) -> None:
    reader = ViewReader.from_store(stack.store, "user_behaviour")
    client = redis.Redis.from_url(stack.redis_url)
    ids = [414, 610]
    with client.pipeline(transaction=False) as pipe:
        reader.queue(pipe, ids)
        replies = pipe.execute()
    rows = reader.decode(ids, replies, CLOCK)
    early = min(r.event_timestamp for r in rows) - timedelta(seconds=1)
    for row in reader.decode(ids, replies, early):
        assert row.future and not row.fresh and not row.expired and row.values == {}


def test_reset_online_rebuilds_the_state_as_of_an_earlier_end(stack) -> None:
    from avrec import feature_store
    from tests.server.conftest import stack_env

    url = stack.redis_url.rsplit("/", 1)[0] + "/5"  # a database no other test uses
    reader = ViewReader.from_store(stack.store, "user_behaviour")
    client = redis.Redis.from_url(url)

    def row_time(user: int):
        return reader.decode_one(user, client.hmget(reader.key(user), reader.fields),
                                 CLOCK + timedelta(days=3650)).event_timestamp

    with stack_env(stack, url):
        store = feature_store.get_store(url)
        epoch = feature_store.EPOCH
        feature_store.materialize(start=epoch, end=CLOCK, redis_url=url)
        latest = row_time(414)
        feature_store.reset_online(store, url)
        assert row_time(414) is None
        earlier = CLOCK - timedelta(days=200)
        feature_store.materialize(start=epoch, end=earlier, redis_url=url)
        assert row_time(414) is not None and row_time(414) <= earlier < latest
    client.flushdb()


@pytest.mark.parametrize("view", ["item_behaviour", "item_embedding"])
def test_the_snapshots_row_cache_reads_what_a_fresh_decode_reads(stack, view: str) -> None:
    """Rows reused from the last read equal a fresh parse (float lists kept as float32
    arrays, value for value); a row whose bytes differ from the last read is parsed again;
    served-or-not follows the clock of each read."""
    from avrec.server.item_snapshot import RowCache

    reader = ViewReader.from_store(stack.store, view)
    client = connect(stack.redis_url)
    ids = np.array([1, 2, 3, 50, 318, 2571, 193609, 999999, 987654321])
    with client.pipeline(transaction=False) as pipe:
        reader.queue(pipe, ids.tolist())
        fresh = reader.decode(ids.tolist(), pipe.execute(), CLOCK)

    def same(rows: list) -> bool:
        """``rows`` equal ``fresh``, each float list as a float32 array of its values."""
        for row, want in zip(rows, fresh, strict=True):
            assert (row.entity_id, row.event_timestamp, row.fresh, row.expired, row.future) == (
                want.entity_id, want.event_timestamp, want.fresh, want.expired, want.future)
            assert row.values.keys() == want.values.keys()
            for name, value in row.values.items():
                expected = want.values[name]
                if isinstance(expected, list) and expected and isinstance(expected[0], float):
                    assert isinstance(value, np.ndarray) and value.dtype == np.float32
                    assert value.tolist() == expected  # float32 in Feast: exact
                else:
                    assert value == expected, (row.entity_id, name)
        return True

    cache = RowCache(reader)
    assert same(cache.read(client, ids, CLOCK)) and cache.parsed == len(ids)
    assert same(cache.read(client, ids, CLOCK)) and cache.parsed == 0  # all reused
    raw, parsed = cache._parsed[2]
    cache._parsed[2] = ((b"other", *raw[1:]), parsed)  # as if item 2 had changed since
    assert same(cache.read(client, ids, CLOCK)) and cache.parsed == 1
    later = CLOCK + timedelta(days=365 * 40)  # past any TTL: withheld, though cached
    rows = cache.read(client, ids, later)
    assert cache.parsed == 0
    assert [r.fresh for r in rows] == [
        r.fresh for r in reader.decode(ids.tolist(), [
            (*c[0],) for c in (cache._parsed[int(i)] for i in ids)], later)]


values = st.one_of(
    st.builds(lambda v: Value(int64_val=v), st.integers(-2**63, 2**63 - 1)),
    st.builds(lambda v: Value(int32_val=v), st.integers(-2**31, 2**31 - 1)),
    st.builds(lambda v: Value(double_val=v), st.floats()),
    st.builds(lambda v: Value(float_val=v), st.floats(width=32)),
    st.builds(lambda v: Value(string_val=v), st.text()),
    st.builds(lambda v: Value(bool_val=v), st.booleans()),
    st.builds(lambda v: Value(bytes_val=v), st.binary()),
    st.builds(lambda v: Value(int64_list_val={"val": v}), st.lists(st.integers(-2**63, 2**63 - 1))),
    st.builds(lambda v: Value(double_list_val={"val": v}), st.lists(st.floats())),
    st.builds(lambda v: Value(float_list_val={"val": v}), st.lists(st.floats(width=32))),
    st.builds(lambda v: Value(string_list_val={"val": v}), st.lists(st.text())),
    st.builds(lambda v: Value(unix_timestamp_val=v), st.integers(0, 2**33)),
    st.builds(lambda v: Value(unix_timestamp_list_val={"val": v}), st.lists(st.integers(0, 2**33))),
    st.builds(lambda v: Value(int64_set_val={"val": v}), st.lists(st.integers(0, 9))),
    st.just(Value()),
)


@given(values)
def test_python_value_equals_feasts_conversion(value: Value) -> None:
    ours, theirs = python_value(value), feast_value_type_to_python_type(value)
    assert type(ours) is type(theirs) and same(ours, theirs)
