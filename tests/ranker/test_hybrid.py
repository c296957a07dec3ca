"""The hybrid ranker: point-in-time inner folds, the candidate pool, exploration slots, and
the shared recommender contract."""

from __future__ import annotations

import functools
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from avrec.ranker import baselines
from avrec.ranker.candidate_pool import (
    TRENDING,
    candidate_pool,
    neighbour_similarity,
    new_item_neighbour_ranks,
    new_item_ranks,
    ranks,
    unit_rows,
)
from avrec.ranker.features import ItemVectors
from avrec.ranker.generator_cache import GeneratorCache
from avrec.ranker.history_scorers import History
from avrec.ranker.hybrid import (
    ContentGenerator,
    HybridConfig,
    HybridRecommender,
    inner_split,
    item_stats,
)
from avrec.ranker.hybrid_features import (
    ITEM_STATS,
    CandidateFeatures,
    UnseenCatalogue,
    UserContext,
    user_context,
    with_exploration_slots,
)
from avrec.ranker.hybrid_pipeline import HybridPipeline, PipelineError, ServedUser
from avrec.ranker.item_history import ItemTimeline
from avrec.ranker.recommender import Recommender
from tests.recommender_contract import ContractData, RecommenderContract

T0 = datetime(2020, 1, 1, tzinfo=UTC)


def _events(n_users: int = 4, per_user: int = 11) -> pl.DataFrame:
    rows = [(u, 100 + (u * 7 + k) % 30, float(1 + (u + k) % 5), T0 + timedelta(hours=k * 3 + u))
            for u in range(1, n_users + 1) for k in range(per_user)]
    return pl.DataFrame(rows, schema=["user_id", "item_id", "value", "event_timestamp"],
                        orient="row")


def test_inner_folds_are_each_users_newest_blocks_with_only_older_events_before() -> None:
    events = _events()
    for fold in (0, 1):
        before, labels = inner_split(events, 0.2, fold)
        for user, own in events.sort("event_timestamp", "item_id").group_by("user_id"):
            own_labels = labels.filter(pl.col("user_id") == user[0])
            own_before = before.filter(pl.col("user_id") == user[0])
            block = 2  # round(0.2 * 11)
            expected = own.slice(own.height - block * (fold + 1), block)
            assert own_labels["event_timestamp"].to_list() == expected["event_timestamp"].to_list()
            assert own_before.height == own.height - block * (fold + 1)
            assert own_before["event_timestamp"].max() < own_labels["event_timestamp"].min()
        # nothing of the labels is in "before", for any user
        assert before.join(labels, on=["user_id", "item_id", "event_timestamp"]).is_empty()


def test_generators_trained_for_the_learner_never_see_its_labels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events = _events(n_users=8)
    items = pl.DataFrame({"item_id": list(range(100, 131))})
    seen: list[pl.DataFrame] = []
    original = HybridRecommender._pipeline

    def recording(self, interactions, items):  # type: ignore[no-untyped-def]
        seen.append(interactions)
        return original(self, interactions, items)

    monkeypatch.setattr(HybridRecommender, "_pipeline", recording)
    config = HybridConfig(candidates=10, inner_folds=2, inner_fraction=0.2, epochs=2, bag=1,
                          cold_slots=0)
    generators = {"knn": functools.partial(baselines.ItemKNN, k=5)}
    model = HybridRecommender(generators, None, config).fit(events, items)
    assert len(seen) == 3  # one per inner fold, then the refit on everything
    keys = ["user_id", "item_id", "event_timestamp"]
    for fold, interactions in enumerate(seen[:2]):
        _, labels = inner_split(events, 0.2, fold)
        assert interactions.join(labels, on=keys).is_empty()
    assert seen[2].height == events.height
    assert model.score([1]).shape == (1, 31)


def test_pool_excludes_seen_items_and_reserves_cold_slots() -> None:
    n = 12
    rank_a = np.tile(np.arange(n), (2, 1))
    rank_b = np.tile(np.arange(n)[::-1], (2, 1))
    seen = np.zeros((2, n), dtype=bool)
    seen[0, [0, 1]] = True
    pool = candidate_pool([rank_a, rank_a, rank_b], seen, 5)
    assert pool.shape == (2, 5)
    assert not np.isin([0, 1], pool[0]).any()
    cold = np.zeros((2, n), dtype=bool)
    cold[:, [9, 10]] = True
    content = np.tile(np.arange(n)[::-1], (2, 1))  # the content generator likes 11, 10, 9, ...
    pool = candidate_pool([rank_a], seen, 5, cold, content, cold_slots=2)
    assert set(pool[0, -2:]) == {9, 10} and set(pool[1, -2:]) == {9, 10}
    assert len(set(pool[0])) == 5


def test_exploration_slots_put_the_best_cold_items_at_the_end_of_the_top() -> None:
    scores = np.array([[9.0, 8, 7, 6, 5, 4, 3]])
    cold = np.array([[0, 0, 0, 0, 1, 0, 1]], dtype=bool)
    out = with_exploration_slots(scores, cold, slots=2, depth=4)
    order = np.argsort(-out[0], kind="stable")
    assert order[:4].tolist() == [0, 1, 4, 6]  # two kept, then the cold ones in their order
    assert order[4:].tolist() == [2, 3, 5]
    # a cold item already in the kept part is not moved, and zero slots change nothing
    np.testing.assert_array_equal(with_exploration_slots(scores, cold, 0, 4), scores)


def test_exploration_slots_can_differ_per_user() -> None:
    scores = np.tile(np.array([9.0, 8, 7, 6, 5, 4, 3]), (3, 1))
    cold = np.tile(np.array([0, 0, 0, 0, 1, 0, 1], dtype=bool), (3, 1))
    out = with_exploration_slots(scores, cold, np.array([2, 0, 1]), depth=4)
    for row, slots in enumerate([2, 0, 1]):
        np.testing.assert_array_equal(out[row], with_exploration_slots(
            scores[row:row + 1], cold[row:row + 1], slots, 4)[0])
    np.testing.assert_array_equal(out[1], scores[1])  # no slots: untouched


def test_new_item_slots_take_trending_new_items_as_well_as_similar_ones() -> None:
    n = 40
    cold = np.zeros((1, n), bool)
    cold[0, 30:] = True  # items 30..39 are new
    content = -np.arange(n, dtype=float)[None, :]  # content prefers low columns: 30 best new
    trending = np.zeros(n)
    trending[39] = 25.0  # the new item everyone watches this month
    exclude = np.zeros((1, n), bool)
    generator = [np.arange(n)[None, :]]  # ranks: column 0 first
    by_content = candidate_pool(generator, exclude, 10, cold, ranks(content, exclude), 2)
    both = new_item_ranks(ranks(content, exclude), [{TRENDING: trending}], cold, exclude)
    with_trending = candidate_pool(generator, exclude, 10, cold, both, 2)
    assert sorted(by_content[0, -2:].tolist()) == [30, 31]
    assert sorted(with_trending[0, -2:].tolist()) == [30, 39]
    assert with_trending[0, :8].tolist() == list(range(8))  # warm part unchanged


def test_neighbour_similarity_is_the_mean_of_the_k_best_cosines() -> None:
    rng = np.random.default_rng(5)
    unit = unit_rows(rng.normal(size=(60, 6)))
    has_vector = rng.random(60) > 0.1
    history, columns = rng.choice(60, 25, replace=False), np.arange(60)
    for k in (1, 3, 40):
        got = neighbour_similarity(unit, has_vector, history, columns, k)
        with_vector = [h for h in history if has_vector[h]]
        for col in columns:  # oracle: every cosine, sorted, best k averaged
            cosines = sorted((float(unit[col] @ unit[h]) for h in with_vector), reverse=True)
            assert got[col] == pytest.approx(np.mean(cosines[:k]), abs=1e-12)
    assert (neighbour_similarity(unit, has_vector, np.array([], np.int64), columns, 3) == 0).all()


def test_new_item_slots_reach_what_a_varied_history_is_near() -> None:
    # a history at two opposite tastes: their mean points at neither
    unit = unit_rows(np.array([[1.0, 0, 0], [-1.0, 0, 0.2],  # seen: the two tastes
                               [0.0, 0, 1], [0.0, 0.3, 1],  # new: near the mean
                               [-1.0, 0, 0.25]]))  # new: next to the second taste
    cold = np.array([[False, False, True, True, True]])
    seen = ~cold
    histories = [History(np.array([0, 1]), np.array([5.0, 5.0]))]
    mean = unit_rows(unit[[0, 1]].mean(0, keepdims=True))[0]
    content = ranks((unit @ mean)[None, :], seen)
    assert np.argsort(content[0])[:2].tolist() == [2, 3]  # the mean profile's two new items
    fused = new_item_neighbour_ranks(content, unit, np.ones(5, bool), histories, cold, seen, 1)
    reserved = candidate_pool([content], seen, 2, cold, fused, 2)
    assert 4 in reserved[0].tolist()


def test_ranks_put_excluded_items_last() -> None:
    got = ranks(np.array([[0.1, 0.9, 0.5]]), np.array([[False, True, False]]))
    assert got.tolist() == [[1, 3, 0]]


def test_ranks_are_the_sorted_order_down_to_the_depth() -> None:
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(4, 500))
    exclude = rng.random((4, 500)) < 0.2
    got = ranks(scores, exclude, depth=50)
    for row in range(4):  # oracle: a full sort of the unexcluded items
        unexcluded = np.flatnonzero(~exclude[row])
        order = unexcluded[np.argsort(-scores[row, unexcluded])]
        assert got[row, order[:50]].tolist() == list(range(50))
        assert (np.delete(got[row], order[:50]) == 50).all()


def test_z_scores_are_over_each_users_unseen_items() -> None:
    rng = np.random.default_rng(5)
    scores = rng.normal(size=(5, 300)) * 40 + 7
    seen = rng.random((5, 300)) < 0.3
    seen[3] = False  # nothing seen
    scores[4] = 2.5  # no spread: z = 0
    pool = rng.integers(0, 300, size=(5, 20))
    got = UnseenCatalogue(seen).z_scores(scores, pool)
    for row in range(5):  # oracle: numpy's mean and std of the unseen scores
        unseen = scores[row, ~seen[row]]
        std = unseen.std() if unseen.std() > 0 else 1.0
        want = np.clip((scores[row, pool[row]] - unseen.mean()) / std, -10, 50)
        np.testing.assert_allclose(got[row], want, atol=1e-12)
    assert (got[4] == 0).all()


def test_feature_names_match_the_feature_columns(contract_data: ContractData) -> None:
    model = _hybrid(0, contract_data).fit(contract_data.train, contract_data.items)
    assert model.pipeline is not None and model.last_pool is None
    model.score(contract_data.users[:3])
    assert model.last_pool is not None
    assert model.last_pool.features.shape[-1] == len(model.pipeline.features.names)
    assert np.isfinite(model.last_pool.features).all()


_VECTORS: list[ItemVectors] = []


def _hybrid(seed: int, data: ContractData, vectors: ItemVectors | None = None
            ) -> HybridRecommender:
    """A small hybrid; ``vectors`` default to random ones for every other catalogue item."""
    if vectors is None:
        item_ids = np.sort(data.items["item_id"].to_numpy())[::2]
        frame = baselines.random_item_vectors(item_ids, dim=8, seed=3)
        vectors = ItemVectors(frame["item_id"].to_numpy(), np.stack(frame["vector"].to_numpy()))
    _VECTORS[:] = [vectors]
    generators = {
        "itemknn": functools.partial(baselines.ItemKNN, k=20, min_value=4.0),
        "ease": functools.partial(baselines.EASE, l2=50.0, min_value=4.0),
        "content": functools.partial(ContentGenerator, vectors),
    }
    config = HybridConfig(candidates=50, epochs=3, bag=2, seed=seed, inner_folds=1)
    return HybridRecommender(generators, vectors, config, seed)


class TestHybrid(RecommenderContract):
    batch_tolerance = (1e-5, 1e-6)  # float32 MLP over batches of users

    def make(self, seed: int, data: ContractData) -> Recommender:
        return _hybrid(seed, data)

    def test_rescore_with_slots_reaches_cold_items(
        self, fitted: Recommender, contract_data: ContractData
    ) -> None:
        assert isinstance(fitted, HybridRecommender)
        users = contract_data.users[:8]
        fitted.score(users)
        known = np.isin(fitted.item_ids, contract_data.train["item_id"].to_numpy())
        plain = np.argsort(-fitted.rescore(0), axis=1)[:, :20]
        explored = np.argsort(-fitted.rescore(3), axis=1)[:, :20]
        assert (~known[explored]).sum(axis=1).min() >= 3
        np.testing.assert_array_equal(plain[:, :17], explored[:, :17])
        # the operating point the harness picks is what score() serves afterwards
        fitted.set_exploration(3, 20)
        try:
            np.testing.assert_array_equal(fitted.score(users), fitted.rescore(3, 20))
        finally:
            fitted.set_exploration(0, 20)
        # slots for the longest histories only: the others keep the plain answer
        lengths = contract_data.train.group_by("user_id").len()
        counts = dict(zip(lengths["user_id"].to_list(), lengths["len"].to_list(), strict=True))
        threshold = fitted.history_threshold(0.5)
        assert 0 < threshold <= max(counts.values())
        targeted = np.argsort(-fitted.rescore(3, 20, threshold), axis=1)[:, :20]
        for row, user in enumerate(users):
            expected = explored if counts.get(int(user), 0) >= threshold else plain
            np.testing.assert_array_equal(targeted[row], expected[row])
        with pytest.raises(ValueError, match="slots"):
            fitted.set_exploration(21, 20)


def test_candidate_features_without_vectors_have_no_content_columns() -> None:
    features = CandidateFeatures(["ease"], None, ["ease"])
    assert "sim_profile" not in features.names and "ease_z" in features.names


def test_one_stats_mapping_for_every_user_gives_the_per_user_features() -> None:
    """A server passes one ``item_stats`` mapping (its columns are computed once for the
    catalogue, then gathered); training passes one per user (gathered, then computed): the
    features are the same to the last bit, and a new mapping is not served stale columns."""
    rng = np.random.default_rng(11)
    items, users = 60, 4
    vectors = rng.normal(size=(items, 5))
    vectors[7] = 0.0  # no vector
    features = CandidateFeatures(["a", "b"], vectors, ["a"], neighbours=2)
    histories = [History(rng.choice(items, 6, replace=False), rng.choice([2.0, 4.5], 6))
                 for _ in range(users)]
    context = UserContext.from_histories(
        histories, np.full(users, np.datetime64("2020-01-01")),
        np.full(users, np.datetime64("2019-12-01")), items, 4.0)
    scores = [rng.normal(size=(users, items)) for _ in range(3)]
    generator_ranks = [ranks(s, context.seen) for s in scores[:2]]
    pool = np.stack([rng.choice(np.flatnonzero(~context.seen[u]), 10, replace=False)
                     for u in range(users)])

    def stats_mapping() -> dict[str, np.ndarray]:
        out = {name: rng.integers(0, 4, items).astype(np.float64) for name in ITEM_STATS}
        out["mean_rating"][rng.random(items) < 0.3] = np.nan
        out["item_age_days"][rng.random(items) < 0.3] = np.nan
        return out

    def built(item_stats: list[dict[str, np.ndarray]]) -> np.ndarray:
        return features.build(context, pool, scores[:2], generator_ranks, item_stats,
                              scores[2:])

    for _ in range(2):  # the second mapping replaces the first one's columns
        stats = stats_mapping()
        shared = built([stats] * users)
        copies = built([{k: v.copy() for k, v in stats.items()} for _ in range(users)])
        np.testing.assert_array_equal(shared, copies)
        assert shared.shape == (users, 10, len(features.names))
        # each column is what its name says (the query's z-score once sat under another name)
        log_all = features.names.index("log_popularity_all")
        np.testing.assert_array_equal(
            shared[..., log_all], np.log1p(stats["popularity_all"][pool]).astype(np.float32))
        query = features.names.index("a_recent10_z")
        np.testing.assert_array_equal(shared[..., query], UnseenCatalogue(context.seen).z_scores(
            scores[2], pool).astype(np.float32))


def _aligned(vectors: ItemVectors, item_ids: np.ndarray) -> np.ndarray:
    rows = vectors.rows(item_ids)
    out = np.zeros((item_ids.size, vectors.dim))
    out[rows >= 0] = vectors.vectors[rows[rows >= 0]]
    return out


def test_the_exported_pipeline_serves_the_trained_models_scores(
    contract_data: ContractData, tmp_path
) -> None:
    model = _hybrid(0, contract_data).fit(contract_data.train, contract_data.items)
    assert model.pipeline is not None
    users = contract_data.users[:6]
    trained = model.score(users)
    torch_pool = model.last_pool
    assert torch_pool is not None and torch_pool.scores is not None
    model.export(tmp_path / "hybrid")
    vectors = _VECTORS[0]
    served = HybridPipeline.load(tmp_path / "hybrid", model.item_ids,
                                 _aligned(vectors, model.item_ids), contract_data.items)
    context = user_context(model.interactions, model.item_ids, users, None, 4.0)
    timeline = ItemTimeline.build(model.interactions, model.item_ids)
    scored = served.score(context, item_stats(timeline, context.cuts))
    np.testing.assert_array_equal(scored.pool, torch_pool.pool)
    np.testing.assert_allclose(scored.features, torch_pool.features, rtol=1e-6)
    np.testing.assert_allclose(scored.scores, torch_pool.scores, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(scored.catalogue_scores(), trained, rtol=1e-4, atol=1e-5)


def test_targeted_exploration_is_saved_and_served_per_user(
    contract_data: ContractData, tmp_path
) -> None:
    model = _hybrid(0, contract_data).fit(contract_data.train, contract_data.items)
    threshold = model.history_threshold(0.5)
    model.set_exploration(3, 20, threshold)
    users = contract_data.users[:8]
    trained = model.score(users)
    plain = model.rescore(0, 20)
    model.export(tmp_path / "hybrid")
    served = HybridPipeline.load(tmp_path / "hybrid", model.item_ids,
                                 _aligned(_VECTORS[0], model.item_ids), contract_data.items)
    assert (served.config.explore, served.config.explore_min_history) == (3, threshold)
    context = user_context(model.interactions, model.item_ids, users, None, 4.0)
    stats = item_stats(ItemTimeline.build(model.interactions, model.item_ids), context.cuts)
    lengths = context.history
    assert lengths.min() < threshold <= lengths.max()  # both kinds of user are asked
    np.testing.assert_allclose(served.score(context, stats).catalogue_scores(3, 20, threshold),
                               trained, rtol=1e-4, atol=1e-5)
    for row, history in enumerate(context.histories):
        user = ServedUser(model.item_ids[history.columns], history.values,
                          context.last_time[row])
        answer = served.recommend(user, stats[row], context.cuts[row], 20)
        np.testing.assert_array_equal(answer.columns,
                                      np.argsort(-trained[row], kind="stable")[:20])
        if lengths[row] >= threshold:
            assert answer.cold[-3:].all()
        else:
            np.testing.assert_array_equal(answer.columns,
                                          np.argsort(-plain[row], kind="stable")[:20])


def test_a_grown_catalogue_reaches_new_items_through_content(
    contract_data: ContractData, tmp_path
) -> None:
    model = _hybrid(0, contract_data).fit(contract_data.train, contract_data.items)
    model.export(tmp_path / "hybrid")
    new_id = int(model.item_ids.max()) + 1
    grown = np.append(model.item_ids, new_id)
    vectors = _aligned(_VECTORS[0], model.item_ids)
    context = user_context(model.interactions, model.item_ids, contract_data.users[:4], None,
                           4.0)
    # the new item's vector is the first user's taste: it must enter their pool
    profile = vectors[context.positives[0]].mean(0)
    served = HybridPipeline.load(tmp_path / "hybrid", grown, np.vstack([vectors, profile]),
                                 contract_data.items)
    grown_context = UserContext.from_histories(context.histories, context.cuts,
                                               context.last_time, grown.size, 4.0)
    timeline = ItemTimeline.build(model.interactions, grown)
    scored = served.score(grown_context, item_stats(timeline, context.cuts))
    assert grown.size - 1 in scored.pool[0]
    assert scored.cold[0][scored.pool[0] == grown.size - 1].all()


def test_a_scorer_exported_for_other_features_is_refused(
    contract_data: ContractData, tmp_path
) -> None:
    model = _hybrid(0, contract_data).fit(contract_data.train, contract_data.items)
    model.export(tmp_path / "hybrid")
    config = json.loads((tmp_path / "hybrid" / "pipeline.json").read_text())
    config["feature_names"][0] = "renamed"
    (tmp_path / "hybrid" / "pipeline.json").write_text(json.dumps(config))
    with pytest.raises(PipelineError, match="not exported for these features"):
        HybridPipeline.load(tmp_path / "hybrid", model.item_ids,
                            _aligned(_VECTORS[0], model.item_ids), contract_data.items)


def test_a_pipeline_saved_with_the_legacy_feature_names_is_still_served(
    contract_data: ContractData, tmp_path
) -> None:
    """Pipelines saved before the query z-scores' names moved to their columns' place list
    the same columns under misplaced names: they are served as they are."""
    model = _hybrid(0, contract_data).fit(contract_data.train, contract_data.items)
    assert model.pipeline is not None
    features = model.pipeline.features
    assert sorted(features.legacy_names) == sorted(features.names)
    assert features.legacy_names != features.names
    model.pipeline.config.feature_names = features.legacy_names
    model.export(tmp_path / "hybrid")
    served = HybridPipeline.load(tmp_path / "hybrid", model.item_ids,
                                 _aligned(_VECTORS[0], model.item_ids), contract_data.items)
    assert served.config.feature_names == features.legacy_names


def test_a_hybrid_fitted_again_on_the_same_data_reuses_the_fit(
    contract_data: ContractData,
) -> None:
    """``served`` wraps exactly its run's ``hybrid-mixed`` fits: the shared cache trains the
    scorer bag once, and each model keeps exploration settings of its own."""
    train, items = contract_data.train, contract_data.items
    cache = GeneratorCache()
    first = _hybrid(0, contract_data)
    first.cache = cache
    first.fit(train, items)
    again = HybridRecommender(first.factories, first.vector_source, first.config, 0,
                              cache=cache).fit(train, items)
    assert again.scorer is first.scorer and again.pipeline is not first.pipeline
    again.set_exploration(3, 20)
    assert (first.pipeline.config.explore, again.pipeline.config.explore) == (0, 3)
    users = contract_data.users[:5]
    np.testing.assert_array_equal(first.score(users), _hybrid(0, contract_data).fit(
        train, items).score(users))  # a fresh fit (own cache) gives the same scores
    other = HybridRecommender(first.factories, first.vector_source,
                              replace(first.config, hidden=16), 0, cache=cache)
    assert other.fit(train, items).scorer is not first.scorer
    later = HybridRecommender(first.factories, first.vector_source, first.config, 0,
                              cache=cache).fit(train.head(train.height - 1), items)
    assert later.scorer is not first.scorer
