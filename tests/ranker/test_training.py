"""The ranker's losses and item-feature dropout against hand-computed oracles."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from avrec.ranker.deep_ranker import sampling_log_q
from avrec.ranker.features import FeatureEncoder
from avrec.ranker.model import Ranker
from avrec.ranker.training import (
    TrainConfig,
    _inputs,
    _Objective,
    candidate_lists,
    fit_ranker,
    torch_threads,
)
from avrec.training_set import TrainingSetSpec


def test_candidate_lists_pair_each_positive_with_its_group() -> None:
    labels = np.array([0, 1, 0, 0, 1, 0, 1, 0])
    groups = np.array([0, 0, 0, 1, 1, 1, 2, 3])
    lists = candidate_lists(labels, groups, width=3)
    # group 0: positive 1 with negatives 0, 2 (padded); group 1: positive 4 with 3, 5;
    # group 2 has no negative: its positive is left out.
    assert lists.tolist() == [[1, 0, 2, -1], [4, 3, 5, -1]]
    assert candidate_lists(labels, groups, width=1).tolist() == [[1, 0], [4, 3]]


class _Fixed(torch.nn.Module):
    """Scores a row by its first item-dense value (a model whose logits we choose)."""

    def forward(self, user_dense, history, history_mask, item_vector, item_dense):
        return item_dense[:, 0]


def _data(logits: list[float], labels: list[int], log_kq: list[float]) -> dict[str, np.ndarray]:
    n = len(logits)
    return {
        "user_dense": np.zeros((n, 1), np.float32),
        "history_idx": np.full((n, 2), -1),
        "item_idx": np.zeros(n, np.int64),
        "item_dense": np.array(logits, np.float32)[:, None],
        "label": np.array(labels, np.float32),
        "group": np.zeros(n, np.int64),
        "log_kq": np.array(log_kq, np.float32),
    }


def test_softmax_loss_corrects_sampled_logits_by_log_kq() -> None:
    logits, log_kq = [2.0, 1.0, 0.5], [0.0, -1.0, 0.3]
    data = _data(logits, [1, 0, 0], log_kq)
    objective = _Objective(data, TrainConfig(loss="softmax"), width=2)
    loss = float(objective(_Fixed(), np.array([0]), np.zeros((1, 2), np.float32)))
    corrected = np.array(logits) - np.array(log_kq)
    expected = -(corrected[0] - np.log(np.exp(corrected).sum()))
    assert loss == pytest.approx(expected, rel=1e-5)


def test_bce_loss_matches_the_formula() -> None:
    data = _data([2.0, -1.0], [1, 0], [0.0, 0.0])
    objective = _Objective(data, TrainConfig(loss="bce"), width=1)
    loss = float(objective(_Fixed(), np.array([0, 1]), np.zeros((1, 2), np.float32)))
    expected = -(np.log(1 / (1 + np.exp(-2.0))) + np.log(1 - 1 / (1 + np.exp(1.0)))) / 2
    assert loss == pytest.approx(expected, rel=1e-5)


def test_item_dropout_blanks_behaviour_but_keeps_marked_columns() -> None:
    data = _data([5.0] * 400, [1] * 400, [0.0] * 400)
    data["item_dense"] = np.tile(np.array([[5.0, 7.0]], np.float32), (400, 1))
    data["item_blank"] = np.array([0.0, np.nan], np.float32)
    feeds = _inputs(data, np.arange(400), np.zeros((1, 2), np.float32), 0.25,
                    np.random.default_rng(0))
    dense = feeds[4].numpy()
    dropped = dense[:, 0] == 0.0
    assert 0.15 < dropped.mean() < 0.35
    assert (dense[~dropped, 0] == 5.0).all() and (dense[:, 1] == 7.0).all()
    untouched = _inputs(data, np.arange(400), np.zeros((1, 2), np.float32), 0.25, None)
    assert (untouched[4].numpy()[:, 0] == 5.0).all()


def test_blank_item_is_what_an_item_without_history_encodes_to() -> None:
    encoder = FeatureEncoder(genres=0)
    rows = pl.DataFrame(
        {
            **{c: pl.Series([None], dtype=pl.Float64) for c in [
                "item_behaviour__popularity_1d", "item_behaviour__popularity_7d",
                "item_behaviour__popularity_30d", "item_behaviour__popularity_all",
                "item_behaviour__rating_count", "item_age_days", "item_behaviour__mean_rating",
                "user_behaviour__mean_rating",
            ]},
        }
    )
    encoder.fit(rows)
    np.testing.assert_array_equal(encoder.item_dense(rows)[0], encoder.blank_item())


def test_sampling_log_q_is_the_sampling_distribution() -> None:
    from datetime import UTC, datetime

    t = datetime(2020, 1, 1, tzinfo=UTC)
    interactions = pl.DataFrame(
        {"item_id": [1, 1, 1, 2], "event_timestamp": [t] * 4}
    )
    items = pl.DataFrame({"item_id": [1, 2, 3, 4]})
    spec = TrainingSetSpec(start=t, end=datetime(2020, 1, 2, tzinfo=UTC), sampling="popularity")
    assert sampling_log_q(interactions, items, spec) == pytest.approx(
        {1: np.log(0.75), 2: np.log(0.25)}
    )
    uniform = TrainingSetSpec(start=t, end=datetime(2020, 1, 2, tzinfo=UTC))
    assert sampling_log_q(interactions, items, uniform) == pytest.approx(
        dict.fromkeys([1, 2, 3, 4], np.log(0.25))
    )


def test_softmax_training_learns_to_rank_the_positive_first() -> None:
    rng = np.random.default_rng(0)
    n_groups, width = 120, 3
    vectors = rng.normal(size=(20, 8)).astype(np.float32)
    liked = rng.integers(0, 10, n_groups)  # positives come from items 0..9, negatives 10..19
    item_idx = np.concatenate([liked[:, None], rng.integers(10, 20, (n_groups, width))], 1)
    n = item_idx.size
    data = {
        "user_dense": np.zeros((n, 2), np.float32),
        "history_idx": np.full((n, 3), -1),
        "item_idx": item_idx.ravel(),
        "item_dense": np.zeros((n, 2), np.float32),
        "label": np.tile([1.0] + [0.0] * width, n_groups).astype(np.float32),
        "group": np.repeat(np.arange(n_groups), width + 1),
        "log_kq": np.zeros(n, np.float32),
    }
    config = TrainConfig(epochs=8, batch_size=128, loss="softmax", progress=False, patience=8)
    with torch_threads(1):
        model, history = fit_ranker(data, data, vectors, config, width=width)
    assert history.val_loss[-1] < 0.5 * np.log(width + 1)
    assert isinstance(model, Ranker)


def test_score_items_equals_forward_with_the_user_repeated() -> None:
    torch.manual_seed(0)
    model = Ranker(user_dense=3, item_dense=2, item_dim=6, dim=8).eval()
    n, length = 7, 5
    user, history = torch.randn(1, 3), torch.randn(1, length, 6)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0]])
    history = history * mask[..., None]
    items, dense = torch.randn(n, 6), torch.randn(n, 2)
    with torch.no_grad():
        full = model(
            user.expand(n, -1), history.expand(n, -1, -1), mask.expand(n, -1), items, dense
        )
        fast = model.score_items(user, history, mask, model.project_items(items), dense, block=3)
        empty = model.score_items(user, history, torch.zeros(1, length),
                                  model.project_items(items), dense)
        empty_full = model(user.expand(n, -1), torch.zeros(n, length, 6),
                           torch.zeros(n, length), items, dense)
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(empty, empty_full, atol=1e-5, rtol=1e-5)
