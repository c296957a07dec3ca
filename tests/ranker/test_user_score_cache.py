"""The hybrid's per-user cache of generator outputs: answers from it equal answers computed
anew, a changed history is a miss, the least recently used user leaves first, and nothing a
request does can change what the next one reads."""

from __future__ import annotations

import numpy as np
import pytest

from avrec.ranker.hybrid import item_stats
from avrec.ranker.hybrid_features import user_context
from avrec.ranker.hybrid_pipeline import HybridPipeline, ServedUser
from avrec.ranker.item_history import ItemTimeline
from avrec.ranker.user_score_cache import RANK_TYPE, GeneratorOutputs, UserScoreCache
from tests.ranker.conftest import ContractData
from tests.ranker.test_hybrid import _VECTORS, _aligned, _hybrid


@pytest.fixture(scope="module")
def served(contract_data: ContractData, tmp_path_factory) -> tuple[HybridPipeline, list, list]:
    """A small trained hybrid loaded as a server loads it, with its users' inputs."""
    model = _hybrid(0, contract_data).fit(contract_data.train, contract_data.items)
    directory = tmp_path_factory.mktemp("hybrid") / "hybrid"
    model.export(directory)
    pipeline = HybridPipeline.load(directory, model.item_ids,
                                   _aligned(_VECTORS[0], model.item_ids), contract_data.items)
    users = contract_data.users[:8]
    context = user_context(model.interactions, model.item_ids, users, None, 4.0)
    stats = item_stats(ItemTimeline.build(model.interactions, model.item_ids), context.cuts)
    inputs = [(ServedUser(model.item_ids[h.columns], h.values, context.last_time[row]),
               stats[row], context.cuts[row]) for row, h in enumerate(context.histories)]
    return pipeline, inputs, model.item_ids


def _answers(pipeline: HybridPipeline, inputs: list, candidates: np.ndarray | None):
    return [pipeline.recommend(user, stats, now, 10 if candidates is None else 0, candidates)
            for user, stats, now in inputs]


@pytest.mark.parametrize("rank", [False, True])
def test_answers_from_the_cache_equal_answers_computed_anew(served, rank: bool) -> None:
    pipeline, inputs, item_ids = served
    candidates = np.arange(0, item_ids.size, 3) if rank else None
    pipeline.user_cache = None
    fresh = _answers(pipeline, inputs, candidates)
    pipeline.user_cache = cache = UserScoreCache(entries=64)
    try:
        first = _answers(pipeline, inputs, candidates)  # misses: computed and stored
        again = _answers(pipeline, inputs, candidates)  # hits
    finally:
        pipeline.user_cache = None
    assert (cache.misses, cache.hits) == (len(inputs), len(inputs))
    for want, *got in zip(fresh, first, again, strict=True):
        for answer in got:
            np.testing.assert_array_equal(answer.columns, want.columns)
            np.testing.assert_array_equal(answer.scores, want.scores)
            np.testing.assert_array_equal(answer.probability, want.probability)


def test_a_new_event_is_a_new_key(served) -> None:
    pipeline, inputs, item_ids = served
    user, stats, now = inputs[0]
    pipeline.user_cache = cache = UserScoreCache(entries=4)
    try:
        pipeline.recommend(user, stats, now, 10)
        grown = ServedUser(np.append(user.history_items, item_ids[-1]),
                           np.append(user.history_ratings, 5.0), user.last_rated_at)
        after = pipeline.recommend(grown, stats, now, 10)
        assert (cache.misses, cache.hits, len(cache)) == (2, 0, 2)
        pipeline.user_cache = None
        want = pipeline.recommend(grown, stats, now, 10)
    finally:
        pipeline.user_cache = None
    np.testing.assert_array_equal(after.columns, want.columns)
    np.testing.assert_array_equal(after.scores, want.scores)


def _outputs(value: float) -> GeneratorOutputs:
    return GeneratorOutputs([np.full((1, 3), value)], [np.arange(3)[None]], [],
                            [(np.zeros((1, 1)), np.ones((1, 1)))])


def test_the_least_recently_used_user_leaves_first() -> None:
    cache = UserScoreCache(entries=2)
    keys = [cache.key(np.array([i]), np.array([4.0])) for i in range(3)]
    cache.put(keys[0], _outputs(0))
    cache.put(keys[1], _outputs(1))
    assert cache.get(keys[0]) is not None  # 0 used last: 1 leaves
    cache.put(keys[2], _outputs(2))
    assert cache.get(keys[1]) is None and cache.get(keys[0]) is not None
    assert len(cache) == 2


def test_stored_outputs_are_read_only_and_ranks_come_back_as_stored() -> None:
    cache = UserScoreCache(entries=1)
    key = cache.key(np.array([1, 2]), np.array([4.0, np.nan]))
    cache.put(key, _outputs(1.5))
    got = cache.get(key)
    assert got is not None and got.ranks[0].dtype == RANK_TYPE
    assert got.ranks[0].tolist() == _outputs(1.5).ranks[0].tolist()
    for array in (got.scores[0], got.ranks[0]):
        with pytest.raises(ValueError, match="read-only"):
            array[0, 0] = 9
    assert cache.key(np.array([1, 2]), np.array([4.0, 5.0])) != key  # ratings are in the key
    with pytest.raises(ValueError, match="do not fit"):
        cache.put(key, GeneratorOutputs([], [np.array([[40_000]])], [], []))


def test_no_entries_is_no_cache() -> None:
    cache = UserScoreCache(entries=0)
    key = cache.key(np.array([1]), np.array([4.0]))
    cache.put(key, _outputs(1))
    assert cache.get(key) is None and len(cache) == 0
    with pytest.raises(ValueError):
        UserScoreCache(entries=-1)


def test_a_hit_reuses_the_features_user_parts(served, monkeypatch) -> None:
    """The features' per-user parts (profile vectors, nearest-history vectors, genre profile)
    are computed once per history and stored read-only with the generator outputs."""
    pipeline, inputs, _ = served
    user, stats, now = inputs[0]
    made = []
    parts_of = pipeline.features.user_parts
    monkeypatch.setattr(pipeline.features, "user_parts",
                        lambda context: made.append(context) or parts_of(context))
    pipeline.user_cache = cache = UserScoreCache(entries=4)
    try:
        pipeline.recommend(user, stats, now, 10)
        pipeline.recommend(user, stats, now, 10)
    finally:
        pipeline.user_cache = None
    assert len(made) == 1 and cache.hits == 1
    (stored,) = cache._items.values()
    assert stored.parts is not None and stored.parts.profile_and_last is not None
    assert stored.parts.arrays() and not any(a.flags.writeable for a in stored.parts.arrays())
