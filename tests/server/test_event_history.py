"""EventHistory.of against the brute-force filter of every event, over random appends."""

from __future__ import annotations

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from avrec.server import event_history
from avrec.server.event_history import EventHistory

ids = st.integers(min_value=1, max_value=12)
events = st.lists(st.tuples(ids, ids), max_size=30)


def frame(rows: list[tuple[int, int]], start: int) -> pl.DataFrame:
    """Events with a ``seq`` column: their place in the order of arrival."""
    return pl.DataFrame(
        {"user_id": [u for u, _ in rows], "item_id": [i for _, i in rows],
         "seq": list(range(start, start + len(rows)))},
        schema={"user_id": pl.Int64, "item_id": pl.Int64, "seq": pl.Int64})


@settings(max_examples=150, deadline=None)
@given(first=events, batches=st.lists(events, max_size=12),
       queries=st.lists(st.tuples(st.sets(ids, max_size=3), st.sets(ids, max_size=3)),
                        min_size=1, max_size=4),
       merge_rows=st.integers(min_value=1, max_value=40),
       asked=st.lists(st.booleans(), min_size=1, max_size=5))
def test_the_rows_of_users_or_items_equal_a_filter_of_every_event(
        first, batches, queries, merge_rows, asked) -> None:
    saved = event_history.MERGE_ROWS, event_history.MAX_CHUNKS
    event_history.MERGE_ROWS, event_history.MAX_CHUNKS = merge_rows, 2  # merge often
    try:
        history = EventHistory(frame(first, 0))
        every = frame(first, 0)
        for n, batch in enumerate(batches):
            appended = frame(batch, every.height)
            history.append(appended)
            every = pl.concat([every, appended])
            if not asked[n % len(asked)]:
                continue  # several batches appended before the next read
            for users, items in queries:  # asked between appends: indexes go stale
                expected = every.filter(pl.col("user_id").is_in(list(users))
                                        | pl.col("item_id").is_in(list(items)))
                got = history.of(users, items)
                assert got.rows() == expected.rows()  # the same events, in arrival order
        assert history.frame.rows() == every.rows()
        assert history.height == every.height
    finally:
        event_history.MERGE_ROWS, event_history.MAX_CHUNKS = saved
