"""The generator cache returns a fit only for the same settings on the same data."""

from __future__ import annotations

import functools

import numpy as np
import polars as pl

from avrec.ranker.baselines import ContentKNN, ItemKNN
from avrec.ranker.generator_cache import GeneratorCache
from avrec.ranker.history_scorers import History
from tests.recommender_contract import ContractData


def _scores(scorer, data: ContractData) -> np.ndarray:
    columns = np.searchsorted(np.sort(data.items["item_id"].to_numpy()),
                              data.train["item_id"].head(30).to_numpy())
    return scorer.score([History(columns, np.full(columns.size, 5.0))])


def test_a_repeated_fit_comes_from_the_cache_and_equals_a_fresh_one(
    contract_data: ContractData,
) -> None:
    cache = GeneratorCache()
    knn = functools.partial(ItemKNN, seed=0, k=20)
    first = cache.fit(knn, contract_data.train, contract_data.items)
    again = cache.fit(knn, contract_data.train.sample(fraction=1.0, shuffle=True, seed=1),
                      contract_data.items)  # same rows, another order
    assert (cache.hits, cache.misses) == (1, 1) and again is first
    fresh = knn().fit(contract_data.train, contract_data.items).history_scorer()
    np.testing.assert_array_equal(_scores(first.scorer, contract_data),
                                  _scores(fresh, contract_data))


def test_other_settings_or_other_data_fit_again(contract_data: ContractData) -> None:
    cache = GeneratorCache()
    train, items = contract_data.train, contract_data.items
    cache.fit(functools.partial(ItemKNN, seed=0, k=20), train, items)
    cache.fit(functools.partial(ItemKNN, seed=0, k=30), train, items)
    cache.fit(functools.partial(ItemKNN, seed=1, k=20), train, items)
    cache.fit(functools.partial(ItemKNN, seed=0, k=20), train.head(train.height - 1), items)
    changed = train.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(1.0)
                                 .otherwise(pl.col("value")).alias("value"))
    cache.fit(functools.partial(ItemKNN, seed=0, k=20), changed, items)
    assert (cache.hits, cache.misses) == (0, 5)


def test_factories_holding_objects_are_never_cached(contract_data: ContractData) -> None:
    vectors = pl.DataFrame({"item_id": contract_data.items["item_id"],
                            "vector": [[1.0, float(i % 7)]
                                          for i in range(contract_data.items.height)]})
    cache = GeneratorCache()
    content = functools.partial(ContentKNN, vectors)
    assert GeneratorCache.key_of(content) is None
    assert GeneratorCache.key_of(lambda: ItemKNN(seed=0)) is None
    for _ in range(2):
        cache.fit(content, contract_data.train, contract_data.items)
    assert (cache.hits, cache.misses, len(cache.entries)) == (0, 2, 0)


def test_the_cache_keeps_the_most_recently_used(contract_data: ContractData) -> None:
    cache = GeneratorCache(size=2)
    train, items = contract_data.train, contract_data.items
    for k in (10, 20, 10, 30):  # 10 is used again before 30 arrives: 20 is evicted
        cache.fit(functools.partial(ItemKNN, seed=0, k=k), train, items)
    kept = sorted(dict(key[0][2])["k"] for key in cache.entries)
    assert kept == [10, 30] and cache.hits == 1
