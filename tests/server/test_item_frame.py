"""The item snapshot's behaviour frame, against a plain polars conversion of the same rows.

:func:`avrec.server.item_snapshot.item_frame` converts timestamps through integer microseconds
and derives item ages without a Python datetime per row (both held the interpreter during
background reloads); the oracle is the direct conversion, ``pl.Series`` of the Python values and
:func:`~avrec.server.item_snapshot.age_days` row by row.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

import polars as pl
import pytest

from avrec.server.feature_reader import OnlineRow, ViewReader
from avrec.server.item_snapshot import AGE, _column, age_days, item_frame

NOW = datetime(2018, 9, 25, 3, 4, 5, 678901, tzinfo=UTC)
FEATURES = ("popularity_7d", "mean_rating", "first_interaction_at")
READER = ViewReader("item_behaviour", "avrec", "item_id", FEATURES, None, 3, ())


def oracle(rows: list[OnlineRow], now: datetime) -> pl.DataFrame:
    columns = {f"item_behaviour__{f}": [r.values.get(f) for r in rows] for f in FEATURES}
    frame = pl.DataFrame([pl.Series(k, v, strict=False) for k, v in columns.items()])
    firsts = frame["item_behaviour__first_interaction_at"].to_list()
    return frame.with_columns(pl.Series(AGE, age_days(now, firsts), dtype=pl.Float64))


def random_rows(seed: int, n: int) -> list[OnlineRow]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if rng.random() < 0.2:  # no row, or one withheld
            rows.append(OnlineRow(i, None, fresh=False, expired=rng.random() < 0.5))
            continue
        first = NOW - timedelta(microseconds=rng.randrange(1, 10**15))
        rows.append(OnlineRow(i, NOW, fresh=True, expired=False, values={
            "popularity_7d": rng.randrange(100),
            "mean_rating": None if rng.random() < 0.3 else rng.uniform(0.5, 5),
            "first_interaction_at": None if rng.random() < 0.1 else first,
        }))
    return rows


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n", [1, 7, 600])
def test_the_item_frame_equals_the_direct_conversion(seed: int, n: int) -> None:
    rows = random_rows(seed, n)
    got, want = item_frame(READER, rows, NOW), oracle(rows, NOW)
    assert got.schema == want.schema
    assert got.equals(want)  # ages to the last bit


def test_a_frame_of_rows_without_values_has_null_columns() -> None:
    rows = [OnlineRow(i, None, fresh=False, expired=False) for i in range(3)]
    got = item_frame(READER, rows, NOW)
    assert got[AGE].to_list() == [None] * 3
    assert got.equals(oracle(rows, NOW))


def test_datetimes_outside_utc_keep_polars_own_conversion() -> None:
    east = timezone(timedelta(hours=2))
    for values in ([datetime(2000, 1, 1), None], [datetime(2000, 1, 1, tzinfo=east)],
                   [datetime(2000, 1, 1, tzinfo=UTC), datetime(2000, 1, 1, tzinfo=east)],
                   [1.5, None]):
        want = pl.Series("x", values, strict=False)
        got = _column("x", values)
        assert got.dtype == want.dtype and got.to_list() == want.to_list()
