"""The served path offline (``avrec evaluate --models served``): item rows read from the
feature table as of a cut, and the served answer against the hybrid it was exported from."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import polars as pl

from avrec import behaviour_features
from avrec.ranker.hybrid_pipeline import item_stats
from avrec.ranker.item_history import ItemTimeline
from avrec.ranker.served import ItemRowsAsOf, ServedRecommender
from tests.ranker.test_hybrid import _hybrid
from tests.recommender_contract import ContractData


def test_item_rows_as_of_a_cut_equal_the_timeline_the_hybrid_trains_on(
    contract_data: ContractData,
) -> None:
    events = contract_data.train.with_columns(pl.lit("rating").alias("event_type"))
    end = events["event_timestamp"].max() + timedelta(days=1)
    table = behaviour_features.item_features(events, end, end)
    item_ids = np.sort(contract_data.items["item_id"].to_numpy())
    rows = ItemRowsAsOf(table, item_ids)
    timeline = ItemTimeline.build(contract_data.train, item_ids)
    times = np.sort(timeline.times)
    for when in times[[len(times) // 5, len(times) // 2, -1]] + np.timedelta64(7, "m"):
        got, want = item_stats(rows.at(when)), timeline.behaviour_at(when)
        for name, values in want.items():
            np.testing.assert_allclose(got[name], np.nan_to_num(values)
                                       if name.startswith("popularity") else values,
                                       rtol=1e-9, atol=1e-9, err_msg=name)


def test_the_served_path_answers_as_the_hybrid_ranks(contract_data: ContractData) -> None:
    events = contract_data.train.with_columns(pl.lit("rating").alias("event_type"))
    end = events["event_timestamp"].max() + timedelta(days=1)
    table = behaviour_features.item_features(events, end, end)
    served = ServedRecommender(_hybrid(0, contract_data), table)
    served.fit(contract_data.train, contract_data.items)
    users = contract_data.users[:5]
    got = served.score(users)
    hybrid = served.hybrid.score(users)
    pool = served.hybrid.last_pool
    assert pool is not None and pool.scores is not None
    for row, answer in enumerate(served.last):
        # the same pool, scored alike (features from the feature table, ONNX vs torch)
        assert sorted(answer.columns.tolist()) == sorted(pool.pool[row].tolist())
        want = dict(zip(pool.pool[row].tolist(), pool.scores[row].tolist(), strict=True))
        np.testing.assert_allclose(answer.scores, [want[c] for c in answer.columns.tolist()],
                                   rtol=1e-4, atol=1e-5)
        top = np.argsort(-got[row], kind="stable")[:10]
        assert set(top.tolist()) == set(np.argsort(-hybrid[row], kind="stable")[:10].tolist())
