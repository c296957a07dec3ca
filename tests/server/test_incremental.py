"""Incremental online rows (``avrec.server.incremental``) equal the offline recomputation
(``avrec.behaviour_features``) after random event sequences: batches at a moving clock,
window exits (times on a 6-hour grid so events leave 1/7/30-day windows exactly at other
events' times), ties in time, out-of-order events, ratings and non-rating events, states
packed and unpacked between batches as they are in Redis. The list caps are cut to a few
entries (recent items 4, history 6) so that random sequences overflow them, in and out of
order."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avrec import behaviour_features, tables
from avrec.server import feature_writer, incremental, incremental_state
from avrec.server.incremental_replay import genre_index, replay, replay_rows
from avrec.server.incremental_state import ItemState, UserState, from_micros, micros

START = datetime(2018, 1, 1, tzinfo=UTC)
GRID = timedelta(hours=6)
GENRES = ["Action", "Comedy", "Drama", "Horror"]
ITEMS = pl.DataFrame({
    "item_id": list(range(1, 31)),
    "genres": [[GENRES[i % 4], GENRES[(i * 7) % 4]] if i % 5 else [] for i in range(30)],
}, schema={"item_id": pl.Int64, "genres": pl.List(pl.Utf8)})
HALF_STARS = [x / 2 for x in range(1, 11)]
RECENT_CAP, HISTORY_CAP = 4, 6


@st.composite
def sessions(draw):
    """Batches of events at a non-decreasing clock; each event at or before its clock."""
    clock = START
    batches = []
    seen = set()
    for _ in range(draw(st.integers(1, 6))):
        clock += GRID * draw(st.sampled_from([0, 1, 4, 28, 120, 124, 200]))
        if draw(st.booleans()):
            clock += timedelta(seconds=draw(st.integers(0, 3)))
        events = []
        for _ in range(draw(st.integers(1, 12))):
            user = draw(st.integers(1, 3))
            item = draw(st.integers(1, 30))
            back = GRID * draw(st.integers(0, 140))  # up to 35 days: in and out of windows
            ts = max(START, clock - back)
            if draw(st.booleans()):
                kind = "rating"
                value = draw(st.sampled_from(HALF_STARS) | st.floats(0.5, 5.0))
            else:
                kind, value = "tag", None
            if kind == "rating" and (user, item, ts) in seen:
                continue  # one rating per (user, item, instant): the offline order of two
            seen.add((user, item, ts)) if kind == "rating" else None  # is undefined
            events.append((user, item, kind, value, ts))
        if events:
            batches.append((clock, events))
    return batches


def frame(rows: list[tuple]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=tables.EVENTS_SCHEMA, orient="row")


def offline_rows(events: pl.DataFrame, now: datetime) -> tuple[dict, dict, dict]:
    """Latest offline row per user / item as of ``now``, and each user's history row."""
    genres = behaviour_features.genre_vocabulary(ITEMS)
    users = behaviour_features.user_features(events, ITEMS, genres, now, now)
    items = behaviour_features.item_features(events, now, now)
    history = behaviour_features.user_history(events, now, now, cap=HISTORY_CAP)

    def latest(rows: pl.DataFrame, key: str) -> dict:
        rows = rows.filter(pl.col("event_timestamp") <= now).sort("event_timestamp")
        return {r[key]: r for r in rows.group_by(key, maintain_order=True).last().to_dicts()}

    return latest(users, "user_id"), latest(items, "item_id"), {
        r["user_id"]: r for r in history.to_dicts()}


def same(ours, theirs, name: str) -> bool:
    if name == "mean_rating" and ours is not None and theirs is not None:
        return math.isclose(ours, theirs, rel_tol=1e-12)  # sums in another order
    if isinstance(theirs, datetime):
        return from_micros(ours) == theirs
    return ours == theirs


def check(user_states: dict[int, UserState], item_states: dict[int, ItemState],
          events: pl.DataFrame, now: datetime, users_only: bool = False) -> None:
    users, items, histories = offline_rows(events, now)
    at = micros(now)
    assert set(user_states) == set(users)
    assert users_only or set(item_states) == set(items)
    for user, state in user_states.items():
        stamp, values = state.behaviour_row(at)
        want = users[user]
        assert from_micros(stamp) == want["event_timestamp"], user
        for name, value in values.items():
            expected = want[name]
            if name == "genre_affinity":
                expected = np.asarray(expected, np.float32).tolist()
            assert same(value, expected, name), (user, name, value, expected)
        history = state.history_row()
        if user not in histories:
            assert history is None
            continue
        h_stamp, h_values = history
        assert from_micros(h_stamp) == histories[user]["event_timestamp"]
        assert h_values["history_items"] == histories[user]["history_items"]
        assert (np.float32(h_values["history_ratings"]).tolist()
                == histories[user]["history_ratings"])
    for item, state in item_states.items():
        stamp, values = state.row(at)
        want = items[item]
        assert from_micros(stamp) == want["event_timestamp"], item
        for name, value in values.items():
            assert same(value, want[name], name), (item, name, value, want[name])


@pytest.mark.slow
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sessions())
def test_incremental_rows_equal_the_offline_recomputation(batches) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(behaviour_features, "RECENT_ITEMS", RECENT_CAP)
        patch.setattr(incremental_state, "RECENT_ITEMS", RECENT_CAP)
        patch.setattr(incremental_state, "HISTORY_CAP", HISTORY_CAP)
        replay_and_check(batches)


def replay_and_check(batches) -> None:
    genres = genre_index(ITEMS, behaviour_features.genre_vocabulary(ITEMS))
    user_blobs: dict[int, bytes] = {}
    item_blobs: dict[int, bytes] = {}
    logged: list[tuple] = []
    for clock, events in batches:
        now = micros(clock)
        logged += events
        users, items = {}, {}
        for user, item, kind, value, ts in events:  # as OnlineUpdater: read, advance, add
            if user not in users:
                users[user] = (UserState.unpack(user_blobs[user]) if user in user_blobs
                               else UserState(len(GENRES)))
                assert users[user].tally.advance(now)
            if item not in items:
                items[item] = (ItemState.unpack(item_blobs[item]) if item in item_blobs
                               else ItemState())
                assert items[item].tally.advance(now)
            t = micros(ts)
            users[user].add(t, item, kind == "rating", value, genres.get(item, ()))
            items[item].add(t, user, kind == "rating", value)
        user_blobs |= {u: s.pack() for u, s in users.items()}
        item_blobs |= {i: s.pack() for i, s in items.items()}
        # every state as of this clock (untouched ones advance too, as a later batch would)
        all_users = {u: UserState.unpack(b) for u, b in user_blobs.items()}
        all_items = {i: ItemState.unpack(b) for i, b in item_blobs.items()}
        for state in [*all_users.values(), *all_items.values()]:
            assert state.tally.advance(now)
        check(all_users, all_items, frame(logged), clock)
        # a state rebuilt from the whole history (a missing or stale state) is the same
        rebuilt = replay(frame(logged), now, genres, len(GENRES))
        check(rebuilt.users, rebuilt.items, frame(logged), clock)
        # ... and so is one rebuilt event by event (a few entities' events, as LogEvents asks)
        one_by_one = replay_rows(frame(logged), now, genres, len(GENRES),
                                 {e[0] for e in logged}, {e[1] for e in logged})
        check(one_by_one.users, one_by_one.items, frame(logged), clock)


def test_a_clock_behind_the_state_is_taken_only_where_the_state_is_exact() -> None:
    genres = genre_index(ITEMS, behaviour_features.genre_vocabulary(ITEMS))
    late, early = START + timedelta(days=40), START + timedelta(days=39)
    events = [(1, 2, "rating", 4.0, START), (1, 3, "tag", None, START + timedelta(days=20))]
    state = replay(frame(events), micros(late), genres, len(GENRES)).users[1]
    assert state.tally.advance(micros(early))  # nothing after it, nothing it needs dropped
    check({1: state}, {}, frame(events), early, users_only=True)
    assert state.tally.advance(micros(late))
    state.add(micros(late), 4, False, None, ())
    assert not state.tally.advance(micros(early))  # an event after the clock
    dropped = replay(frame(events), micros(START + timedelta(days=60)), genres, len(GENRES))
    assert not dropped.users[1].tally.advance(micros(START + timedelta(days=45)))


VALUE_CASES = [
    ("INT64", 0), ("INT64", 12_345_678_901), ("DOUBLE", 3.75), ("DOUBLE", 1 / 3),
    ("DOUBLE", None), ("DOUBLE", math.nan),
    ("UNIX_TIMESTAMP", datetime(2018, 9, 24, 12, 34, 56, 789_012, tzinfo=UTC)),
    ("UNIX_TIMESTAMP", None),
    ("FLOAT_LIST", np.asarray([0.1, 0.25, 1 / 3], np.float32).tolist()),
    ("INT64_LIST", [3, 1, 2_000_000_000_000]), ("INT64_LIST", []),
]


@pytest.mark.parametrize(("kind", "value"), VALUE_CASES)
def test_raw_values_are_feasts_bytes(kind: str, value) -> None:
    from feast.type_map import python_values_to_proto_values
    from feast.value_type import ValueType

    ours = micros(value) if isinstance(value, datetime) else value
    (theirs,) = python_values_to_proto_values([value], ValueType[kind])
    assert feature_writer._value(kind, ours).SerializeToString() == theirs.SerializeToString()


def test_logged_events_leave_the_offline_rows_online(online_service) -> None:
    """Through the running service: Feast's reads of the touched users' and items' rows
    equal the offline code on every event the server holds, as of its clock. On a single
    Redis (one WATCH/MULTI batch) and on the Redis Cluster (a compare-and-set per entity)."""
    from avrec.server.client import RankingClient
    from avrec.v1 import ranking_pb2

    stack, service = online_service

    clock = service.engine.clock.now()
    specs = [  # user, item, type, rating, time (None: the server's now)
        (414, 318, "rating", 4.5, None), (414, 1, "tag", None, clock - timedelta(days=3)),
        (414, 2571, "rating", 2.0, clock - timedelta(days=40)),  # out of order, old
        (7, 318, "rating", 5.0, clock - timedelta(hours=30)), (7, 50, "tag", None, None),
        (123456, 50, "rating", 3.5, None),  # a new user
    ]
    events = []
    for user, item, kind, rating, when in specs:
        event = ranking_pb2.Event(user_id=user, item_id=item, event_type=kind,
                                  rating=rating or 0.0)
        if when is not None:
            event.event_timestamp.FromDatetime(when)
        events.append(event)
    with RankingClient(f"127.0.0.1:{service.port}") as client:
        assert client.log_events(events).accepted == len(events)
    assert_online_rows_are_offline_rows(stack, sorted({s[0] for s in specs}),
                                        sorted({s[1] for s in specs}), service.engine.clock.now())


def test_a_concurrent_write_makes_the_batch_redo(online_service) -> None:
    """A write to a touched entity between the reads and the write (another server process)
    fails the MULTI/EXEC under WATCH (``WatchedBatch.commit``; on the cluster: that entity's
    compare-and-set); the batch (that entity) is redone on the new state."""
    from avrec.server.event_log import EventLog, LoggedEvent

    stack, service = online_service
    offline = stack.data_dir / "offline"
    log = EventLog(offline, tables.read_table("items", offline)["item_id"].to_numpy(),
                   service.engine.client)
    first = LoggedEvent(414, 1, "rating", 3.0, None)
    log.log(stack.store, [first], service.engine.clock.now())
    updater = log.updater
    read, intruded = updater._read, []

    def read_then_intrude(users, items, *batch):
        replies = read(users, items, *batch)
        if not intruded:  # another writer replaced the state after this batch read it
            # (with bytes that do not parse: the redo rebuilds it from the event history)
            updater.client.hset(updater.key(updater.user, users[0]),
                                incremental.state_field("user_behaviour"), b"another writer")
            intruded.append(True)
        return replies

    updater._read = read_then_intrude
    now = service.engine.clock.now()
    log.log(stack.store, [LoggedEvent(414, 2, "tag", None, None),
                          LoggedEvent(414, 318, "rating", 5.0, None)], now)
    assert intruded and updater.redone == 1
    assert_online_rows_are_offline_rows(stack, [414], [1, 2, 318], now)


def test_the_memo_of_hash_keys_stays_bounded(online_service, monkeypatch) -> None:
    """The updater's memo of Feast hash keys is emptied when full (its memory must not grow
    with the number of users) and the rows are still written where Feast reads them."""
    from avrec.server.event_log import EventLog, LoggedEvent

    stack, service = online_service
    monkeypatch.setattr(incremental, "KEYS_KEPT", 3)
    offline = stack.data_dir / "offline"
    log = EventLog(offline, tables.read_table("items", offline)["item_id"].to_numpy(),
                   service.engine.client)
    now = service.engine.clock.now()
    for user, item in [(414, 1), (7, 2), (123457, 318), (414, 2)]:
        log.log(stack.store, [LoggedEvent(user, item, "rating", 4.0, None)], now)
        assert len(log.updater._keys) <= 3
    assert_online_rows_are_offline_rows(stack, [7, 414, 123457], [1, 2, 318], now)


def assert_online_rows_are_offline_rows(stack, users: list[int], touched: list[int],
                                        now: datetime) -> None:
    """Feast's reads of the users' and items' rows equal the offline code as of ``now``."""
    offline = stack.data_dir / "offline"
    history = tables.read_events(offline)
    items = tables.read_table("items", offline)
    genres = behaviour_features.genre_vocabulary(items)

    def latest(rows: pl.DataFrame, key: str) -> dict:
        rows = rows.filter(pl.col("event_timestamp") <= now).sort("event_timestamp")
        return {r[key]: r for r in rows.group_by(key, maintain_order=True).last().to_dicts()}

    views = {
        "user_behaviour": ("user_id", users, latest(behaviour_features.user_features(
            history.filter(pl.col("user_id").is_in(users)), items, genres, now, now),
            "user_id")),
        "user_history": ("user_id", users, {r["user_id"]: r for r in behaviour_features
                                           .user_history(history, now, now).to_dicts()}),
        "item_behaviour": ("item_id", touched, latest(behaviour_features.item_features(
            history.filter(pl.col("item_id").is_in(touched)), now, now), "item_id")),
    }
    for view, (key, ids, want) in views.items():
        names = [f.name for f in stack.store.get_feature_view(view).features]
        read = stack.store.get_online_features(
            features=[f"{view}:{n}" for n in names],
            entity_rows=[{key: i} for i in ids]).to_dict()
        for j, entity in enumerate(ids):
            for name in names:
                expected = want[entity][name]
                if isinstance(expected, datetime):  # Feast keeps whole seconds
                    expected = expected.replace(microsecond=0)
                    assert read[name][j].astimezone(UTC) == expected, (view, entity, name)
                elif isinstance(expected, list) and expected and isinstance(expected[0], float):
                    np.testing.assert_allclose(read[name][j], np.float32(expected), rtol=0)
                elif name == "mean_rating":
                    assert read[name][j] == pytest.approx(expected, rel=1e-12)
                else:
                    assert read[name][j] == expected, (view, entity, name)


def test_a_state_that_does_not_parse_is_rebuilt() -> None:
    genres = genre_index(ITEMS, behaviour_features.genre_vocabulary(ITEMS))
    events = frame([(1, 2, "rating", 4.0, START), (1, 3, "tag", None, START)])
    state = replay(events, micros(START), genres, len(GENRES)).users[1]
    blob = state.pack()
    assert UserState.unpack(blob).behaviour_row(micros(START)) == state.behaviour_row(
        micros(START))
    for bad in (b"", b"{}", blob[:-3], blob + b"x", b"\x01" + blob[1:]):
        assert UserState.unpack(bad) is None and ItemState.unpack(bad) is None
