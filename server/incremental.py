"""Incremental online behaviour rows: ``LogEvents`` updates a user's (and an item's) row from
a small per-entity state instead of recomputing the whole history.

The rows are exactly those of the offline code (:mod:`avrec.behaviour_features`) as of the
server's clock: ``tests/server/test_incremental.py`` proves it on random event sequences
(window exits, ties in time, out-of-order events, ratings and other events). What a row
needs that the row itself does not keep is the **state** (:mod:`avrec.server.incremental_state`:
what it holds, how it is updated and packed), stored in the entity's own Feast hash (field
``_avrec_state:<view>``, beside Feast's ``_ts:<view>``; Feast reads and writes only its own
fields).

A state is rebuilt from the server's event history (:mod:`avrec.server.incremental_replay`) when it
is missing or when the Feast row no longer carries the stamp the state last wrote (``avrec
materialize`` wrote a newer row), or when the clock went back past the state's events (a
replay clock restarted; the rebuilt rows then leave out events after the clock, as the
offline code does at that clock).
Each batch watches the touched hashes and reads all states and row stamps in one round trip
(``WATCH``, one HMGET per entity) and writes each entity's rows and state in one HSET, all in
one ``MULTI/EXEC`` (another writer in between: the batch is redone;
:mod:`avrec.server.watched_batch`). A Redis Cluster
cannot watch keys of several slots: there each entity's HSET is a compare-and-set on the
state and stamp it read (:mod:`avrec.server.compare_and_set`), redone for that entity alone; each
entity changes atomically, the batch not as a whole. Rows are written
unconditionally (Feast's own writer skips a row whose stamp is not newer, which loses a
second event at the same instant). The row values are encoded by
:mod:`avrec.server.feature_writer`, as Feast encodes them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING

import polars as pl

from avrec.names import ITEM_BEHAVIOUR, USER_BEHAVIOUR, USER_HISTORY
from avrec.server import compare_and_set
from avrec.server.feature_writer import ViewWriter, stamp_us
from avrec.server.incremental_replay import event_rows, genre_index, replay
from avrec.server.incremental_state import ItemState, UserState, micros
from avrec.server.watched_batch import WatchedBatch

if TYPE_CHECKING:
    import redis
    from feast import FeatureStore

USER_VIEW, HISTORY_VIEW, ITEM_VIEW = USER_BEHAVIOUR, USER_HISTORY, ITEM_BEHAVIOUR
MAX_REDOS = 20  # batches redone after concurrent writes before the call fails
KEYS_KEPT = 1 << 16  # Feast hash keys memoised (~200 bytes each)


def state_field(view: str) -> str:
    """The hash field (next to Feast's ``_ts:<view>``) that holds an entity's state."""
    return f"_avrec_state:{view}"


class OnlineUpdater:
    """Applies a batch of accepted events to the users' and items' online rows."""

    def __init__(self, store: FeatureStore, client: redis.Redis, items: pl.DataFrame,
                 genres: list[str], history: Callable[[set[int], set[int]], pl.DataFrame],
                 update_items: bool = True) -> None:
        """``history(users, items)``: the events of those users or items that the server
        knows (a rebuilt state replays them; :meth:`EventHistory.of
        <avrec.server.event_history.EventHistory.of>`)."""
        self.client, self.history, self.update_items = client, history, update_items
        views = {v.name for v in store.list_feature_views()}
        self.user = ViewWriter.from_store(store, USER_VIEW)
        self.user_history = (ViewWriter.from_store(store, HISTORY_VIEW)
                             if HISTORY_VIEW in views else None)
        self.item = ViewWriter.from_store(store, ITEM_VIEW) if update_items else None
        self.genres = genre_index(items, genres)
        self.n_genres = len(genres)
        self.rebuilt = 0  # states rebuilt from the event history (missing or stale)
        self.redone = 0  # batches redone because another writer touched their entities
        self._keys: dict[tuple[str, int], bytes] = {}  # Feast's hash keys (10-60 µs each)
        self.user_fields = [state_field(USER_VIEW), self.user.reader.fields[-1]]
        self.item_fields = ([state_field(ITEM_VIEW), self.item.reader.fields[-1]]
                            if self.item is not None else None)

    def key(self, writer: ViewWriter, entity_id: int) -> bytes:
        """The entity's Feast hash (users' two views share it), kept for the next events of
        the same entities (at most :data:`KEYS_KEPT`: the memo is emptied when full, so its
        memory does not grow with the number of users)."""
        cached = self._keys.get((writer.reader.join_key, entity_id))
        if cached is None:
            if len(self._keys) >= KEYS_KEPT:
                self._keys.clear()
            cached = self._keys[(writer.reader.join_key, entity_id)] = writer.reader.key(
                entity_id)
        return cached

    def update(self, frame: pl.DataFrame, now_dt: datetime) -> None:
        """Read the touched states, apply ``frame`` (already in the event history), write
        states and rows; all under WATCH so a concurrent writer makes the batch redo (on a
        Redis Cluster: per entity, :meth:`_update_per_key`)."""
        import redis

        now = micros(now_dt)
        events = event_rows(frame)
        users = sorted({e[0] for e in events})
        items = sorted({e[1] for e in events}) if self.item is not None else []
        if isinstance(self.client, redis.RedisCluster):
            self._update_per_key(users, items, events, now)
            return
        with WatchedBatch(self.client) as batch:
            for _ in range(MAX_REDOS):
                replies = self._read(users, items, batch)
                user_states, item_states = self._states(users, items, replies, now, events)
                writes = [("HSET", key, *(x for pair in mapping.items() for x in pair))
                          for key, mapping, _ in self._mappings(users, items, user_states,
                                                                item_states, now)]
                if batch.commit(writes):
                    return
                self.redone += 1
        raise RuntimeError(f"online rows of {len(users) + len(items)} entities changed under "
                           f"{MAX_REDOS} tries in a row; the events are logged offline")

    def _update_per_key(self, users: list[int], items: list[int],
                        events: list[tuple[int, int, bool, float | None, int]],
                        now: int) -> None:
        """The cluster form of :meth:`update`: one read pipeline, then one compare-and-set
        per entity hash (:mod:`avrec.server.compare_and_set`: written only if its state and row
        stamp still hold what was read); the entities another writer changed meanwhile are
        read and applied again, alone. Each entity's rows and state change atomically; the
        batch as a whole does not (readers may see one user's rows before another's)."""
        for _ in range(MAX_REDOS):
            replies = self._read(users, items)
            user_states, item_states = self._states(users, items, replies, now, events)
            seen = dict(zip([self.key(self.user, u) for u in users]
                            + [self.key(self.item, i) for i in items],  # type: ignore[arg-type]
                            replies, strict=True))
            written = []
            with self.client.pipeline(transaction=False) as pipe:
                for key, mapping, checked in self._mappings(users, items, user_states,
                                                            item_states, now):
                    compare_and_set.queue(pipe, key, checked, seen[key], mapping)
                    written.append(key)
                done = {key for key, ok in zip(written, pipe.execute(), strict=True) if ok}
            if len(done) == len(written):
                return
            self.redone += 1
            users = [u for u in users if self.key(self.user, u) not in done]
            items = [i for i in items if self.key(self.item, i) not in done]  # type:
                                                                              # ignore[arg-type]
        raise RuntimeError(f"online rows of {len(users) + len(items)} entities changed under "
                           f"{MAX_REDOS} tries in a row; the events are logged offline")

    def _read(self, users: list[int], items: list[int],
              batch: WatchedBatch | None = None) -> list[list[bytes | None]]:
        """Each entity's state and the stamp of its row, in one round trip (with ``batch``:
        the same round trip watches their hashes)."""
        if batch is not None:
            keys = ([self.key(self.user, u) for u in users]
                    + [self.key(self.item, i) for i in items])  # type: ignore[arg-type]
            fields = [self.user_fields] * len(users) + [self.item_fields] * len(items)
            return batch.watch_and_read(keys, [("HMGET", key, *f) for key, f in zip(
                keys, fields, strict=True)])
        with self.client.pipeline(transaction=False) as reads:
            for u in users:
                reads.hmget(self.key(self.user, u), self.user_fields)
            for i in items:
                reads.hmget(self.key(self.item, i), self.item_fields)  # type: ignore[arg-type]
            return reads.execute()

    def _states(self, users: list[int], items: list[int], replies: list[list[bytes | None]],
                now: int, events: list[tuple[int, int, bool, float | None, int]]
                ) -> tuple[dict[int, UserState], dict[int, ItemState]]:
        """Each touched entity's state with the batch applied (rebuilt when unusable)."""
        user_states: dict[int, UserState] = {}
        item_states: dict[int, ItemState] = {}
        stale_users, stale_items = set(), set()
        for ids, out, stale, offset, cls in (
            (users, user_states, stale_users, 0, UserState),
            (items, item_states, stale_items, len(users), ItemState),
        ):
            for j, entity in enumerate(ids):
                blob, stamp = replies[offset + j]
                state = cls.unpack(blob) if blob else None
                if (state is None or not state.tally.advance(now)
                        or stamp_us(stamp) != state.tally.written):
                    stale.add(entity)
                else:
                    out[entity] = state
        if stale_users or stale_items:
            # the event history already holds this batch: the rebuilt states include it
            rebuilt = replay(self.history(stale_users, stale_items), now, self.genres,
                             self.n_genres, stale_users, stale_items)
            self.rebuilt += len(stale_users) + len(stale_items)
            user_states |= rebuilt.users
            item_states |= rebuilt.items
        for user, item, is_rating, value, ts in events:  # (a redo may cover some entities)
            if user not in stale_users and user in user_states:
                user_states[user].add(ts, item, is_rating, value, self.genres.get(item, ()))
            if self.item is not None and item not in stale_items and item in item_states:
                item_states[item].add(ts, user, is_rating, value)
        return user_states, item_states

    def _mappings(self, users: list[int], items: list[int],
                  user_states: dict[int, UserState], item_states: dict[int, ItemState],
                  now: int) -> Iterator[tuple[bytes, dict[bytes | str, bytes], list[str]]]:
        """Each entity's hash key, its fields to set (its row(s) and its state) and the
        fields its state was read from (state and row stamp)."""
        for u in users:
            state = user_states[u]
            if not state.tally.n:  # nothing at or before the clock (it went back)
                continue
            stamp, values = state.behaviour_row(now)
            state.tally.written = stamp
            mapping = self.user.mapping(stamp, values)
            history = state.history_row()
            if history is not None and self.user_history is not None:
                mapping |= self.user_history.mapping(*history)  # the same entity hash
            mapping[self.user_fields[0]] = state.pack()
            yield self.key(self.user, u), mapping, self.user_fields
        for i in items:
            item_state = item_states[i]
            if self.item is None or not item_state.tally.n:
                continue
            stamp, values = item_state.row(now)
            item_state.tally.written = stamp
            mapping = self.item.mapping(stamp, values)
            mapping[self.item_fields[0]] = item_state.pack()
            yield self.key(self.item, i), mapping, self.item_fields  # type: ignore[misc]

