"""The sequential model: windows and padding, held-out blocks, content-only cold items, and
the shared recommender contract."""

from __future__ import annotations

import numpy as np
import polars as pl
import torch

from avrec.ranker import baselines
from avrec.ranker.features import ItemVectors
from avrec.ranker.recommender import Recommender
from avrec.ranker.sequence_data import (
    UserSequences,
    holdout_sizes,
    left_pad,
    rating_buckets,
    training_windows,
)
from avrec.ranker.sequential import SequentialConfig, SequentialRecommender
from tests.recommender_contract import ContractData, RecommenderContract


def _sequences(lengths: list[int]) -> UserSequences:
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    index = np.arange(1, offsets[-1] + 1)
    return UserSequences(np.arange(1, len(lengths) + 1), offsets, index, np.ones_like(index))


def test_left_pad_keeps_the_newest_items_at_the_end() -> None:
    out = left_pad([np.array([1, 2, 3]), np.array([4])], 2)
    assert out.tolist() == [[2, 3], [0, 4]]


def test_rating_buckets_are_half_stars_with_zero_for_missing() -> None:
    assert rating_buckets(np.array([0.5, 4.0, 5.0, np.nan, 7.0])).tolist() == [1, 8, 10, 0, 10]


def test_windows_tile_history_without_the_held_out_block() -> None:
    sequences = _sequences([10, 1, 4])
    held = holdout_sizes(sequences, 0.2)
    assert held.tolist() == [2, 0, 1]  # one event alone is never held out
    items, _ = training_windows(sequences, max_length=3, held=held)
    # user 1 keeps events 1..8 -> windows of 4 from the newest end, overlapping by one
    assert [w.tolist() for w in items] == [[5, 6, 7, 8], [2, 3, 4, 5], [1, 2], [12, 13, 14]]
    assert all(not np.isin([9, 10, 15], w).any() for w in items)


def _vectors(data: ContractData, every: int = 2) -> ItemVectors:
    item_ids = np.sort(data.items["item_id"].to_numpy())[::every]
    frame = baselines.random_item_vectors(item_ids, dim=8, seed=3)
    return ItemVectors(frame["item_id"].to_numpy(), np.stack(frame["vector"].to_numpy()))


def _model(seed: int, data: ContractData, use_content: bool = True) -> SequentialRecommender:
    config = SequentialConfig(dim=16, max_length=30, epochs=2, negatives=256, seed=seed)
    return SequentialRecommender(config, _vectors(data) if use_content else None, seed)


class TestSequential(RecommenderContract):
    batch_tolerance = (1e-5, 1e-6)  # float32 attention over batches of users

    def make(self, seed: int, data: ContractData) -> Recommender:
        return _model(seed, data)

    def test_items_without_interactions_are_scored_through_content_alone(
        self, fitted: Recommender, contract_data: ContractData
    ) -> None:
        assert isinstance(fitted, SequentialRecommender) and fitted.encoder is not None
        users = contract_data.users[:4]
        before = fitted.score(users)
        with torch.no_grad():  # scramble every ID vector of the items nobody had
            cold = np.flatnonzero(~fitted.warm) + 1
            fitted.encoder.items.ids.weight[torch.from_numpy(cold)] += 5.0
        after = fitted.score(users)
        np.testing.assert_array_equal(before[:, cold - 1], after[:, cold - 1])
        # cold items with content are told apart; those without content share one vector
        with_content = np.isin(fitted.item_ids, _vectors(contract_data).item_ids)
        cold_cols = cold - 1
        assert np.unique(before[0, cold_cols[with_content[cold_cols]]]).size > 1
        assert np.unique(before[0, cold_cols[~with_content[cold_cols]]]).size == 1


def test_an_id_only_model_learns_from_the_sequence(contract_data: ContractData) -> None:
    model = _model(0, contract_data, use_content=False).fit(contract_data.train,
                                                            contract_data.items)
    assert model.history.train_loss[-1] < model.history.train_loss[0]
    assert model.history.best_epoch >= 0
    users = contract_data.users[:3]
    assert model.score(users).std(axis=1).min() > 0


def test_sequences_are_ordered_by_time_then_item(contract_data: ContractData) -> None:
    frame = pl.DataFrame({
        "user_id": [1, 1, 1], "item_id": [30, 10, 20], "value": [4.0, None, 2.0],
        "event_timestamp": pl.Series([3, 1, 1]).cast(pl.Datetime("us")),
    })
    sequences = UserSequences.build(frame, np.array([10, 20, 30]))
    index, ratings = sequences.of(0)
    assert index.tolist() == [1, 2, 3] and ratings.tolist() == [0, 4, 8]
