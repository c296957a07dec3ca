"""The one-row (serving) encodings equal the frame (training) encodings on real rows."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import polars as pl

from avrec import behaviour_features, tables
from avrec.pit_join import join_features_duckdb
from avrec.ranker.features import FeatureEncoder, ItemVectors


def test_record_encoding_equals_frame_encoding(movielens_offline, feature_store) -> None:
    events = tables.read_table("events", movielens_offline)
    items = tables.read_table("items", movielens_offline)
    sample = events.sample(300, seed=0).select("user_id", "item_id", "event_timestamp")
    labels = sample.rename({"event_timestamp": "label_timestamp"}).vstack(pl.DataFrame({
        "user_id": [987654321], "item_id": [1],  # a user without history: all missing
        "label_timestamp": [datetime(2018, 1, 1, tzinfo=UTC)],
    }, schema=sample.rename({"event_timestamp": "label_timestamp"}).schema))
    rows = join_features_duckdb(labels, feature_store, "user_features")
    encoder = FeatureEncoder(genres=len(behaviour_features.genre_vocabulary(items))).fit(
        join_features_duckdb(labels, feature_store, "behaviour_features"))
    ids = items["item_id"].to_numpy()[::2]
    vectors = ItemVectors(ids, np.random.default_rng(0).normal(size=(len(ids), 4)))
    frame_dense = encoder.user_dense(rows)
    frame_history = encoder.history_rows(rows, vectors)
    for i, record in enumerate(rows.iter_rows(named=True)):
        np.testing.assert_allclose(encoder.user_dense_record(record)[0], frame_dense[i],
                                   rtol=1e-6, atol=1e-7)
        history = encoder.history_row(record["user_behaviour__recent_items"], vectors)
        np.testing.assert_array_equal(history[0], frame_history[i])
    assert frame_dense[-1][encoder.user_dense_names.index("user_missing")] == 1.0
