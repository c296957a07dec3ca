"""A small generated catalogue with a planted answer: the fast tier of the recommender contract.

Not a test module (pytest does not collect it). :func:`synthetic_catalogue` draws, from one
seed,

* 100 items: :data:`PER_CLUSTER` in each of the :data:`GENRES` taste clusters (the item's
  one genre is its cluster's), plus one :data:`BLOCKBUSTER` with no genre;
* :data:`N_USERS` users, each in one cluster: every user rates the blockbuster (4 or 5
  stars), :data:`LIKED` items of their own cluster (4 or 5 stars) and :data:`DISLIKED` items
  of other clusters (1 or 2 stars), at random instants of 2017.

So the answers are known: the blockbuster is the most interacted item (every user has it; no
other item has more than about a third of the users), so it tops the popularity fallback of
cold users; and a user's best unseen items are the unseen items of their own cluster.
:func:`item_vectors` gives content vectors with the same structure (a cluster centre plus
noise), for the models that read item vectors.

:func:`write_offline` writes the catalogue as the offline tables (``events``, ``items`` and
the behaviour-feature tables that ``avrec features`` builds), so the models that read
point-in-time features through Feast's registry and the DuckDB offline store (the deep ranker,
the two-tower model) run on it too: :func:`synthetic_store` applies avrec's own feature repo
over those tables in a private data directory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from avrec import behaviour_features, tables
from avrec.ranker.features import ItemVectors
from tests.recommender_contract import ContractData, PlantedAnswer

if TYPE_CHECKING:
    from feast import FeatureStore

GENRES = ("Action", "Comedy", "Drama", "Horror")
PER_CLUSTER = 24
N_USERS = 240
LIKED = 10  # own-cluster items each user rates 4 or 5
DISLIKED = 2  # other-cluster items each user rates 1 or 2
BLOCKBUSTER = 500  # the item every user rated
START = datetime(2017, 1, 1, tzinfo=UTC)
END = datetime(2017, 12, 1, tzinfo=UTC)
SEED = 20170101


@dataclass(frozen=True)
class SyntheticCatalogue:
    """The generated data and its planted answer."""

    events: pl.DataFrame  # the offline ``events`` table (ratings)
    items: pl.DataFrame  # the offline ``items`` table, rows in a shuffled order
    user_cluster: dict[int, int]  # user id -> index into GENRES
    item_cluster: dict[int, int]  # item id -> index into GENRES (the blockbuster has none)

    def contract_data(self, n_scored: int = 40) -> ContractData:
        """The contract's view: all events, the catalogue, ``n_scored`` users in a seeded order."""
        train = self.events.select("user_id", "item_id", "value", "event_timestamp")
        users = np.array(sorted(self.user_cluster))
        order = np.random.default_rng(0).permutation(users.size)[:n_scored]
        answer = PlantedAnswer(self.user_cluster, self.item_cluster, BLOCKBUSTER)
        return ContractData(train, self.items, users[order], answer)


def synthetic_catalogue(seed: int = SEED) -> SyntheticCatalogue:
    """The catalogue described in the module docstring, the same for the same ``seed``."""
    rng = np.random.default_rng(seed)
    n_items = len(GENRES) * PER_CLUSTER + 1
    # ids 10, 20, ..., 970 in a shuffled assignment to clusters; the blockbuster in the middle
    ids = np.array([10 * (k + 1) for k in range(n_items) if 10 * (k + 1) != BLOCKBUSTER])
    ids = rng.permutation(ids[: n_items - 1])
    item_cluster = {int(item): k // PER_CLUSTER for k, item in enumerate(ids)}
    by_cluster = [ids[c * PER_CLUSTER : (c + 1) * PER_CLUSTER] for c in range(len(GENRES))]
    catalogue = [*item_cluster, BLOCKBUSTER]
    items = pl.DataFrame(
        {
            "item_id": catalogue,
            "title": [f"Item {i}" for i in catalogue],
            "year": [2000 + i % 17 for i in catalogue],
            "genres": [[GENRES[item_cluster[i]]] if i in item_cluster else [] for i in catalogue],
            "tags": [[] for _ in catalogue],
            "description": [None] * len(catalogue),
            "image_path": [None] * len(catalogue),
        },
        schema=tables.ITEMS_SCHEMA,
    ).sample(fraction=1.0, shuffle=True, seed=seed)

    users = 3 * np.arange(N_USERS) + 1  # ids 1, 4, 7, ...
    user_cluster = {int(u): int(u) % len(GENRES) for u in users}
    span_us = int((END - START).total_seconds() * 1e6)
    rows: list[tuple[int, int, float, int]] = []
    for user, cluster in user_cluster.items():
        liked = rng.choice(by_cluster[cluster], LIKED, replace=False)
        others = np.concatenate([b for c, b in enumerate(by_cluster) if c != cluster])
        disliked = rng.choice(others, DISLIKED, replace=False)
        chosen = [BLOCKBUSTER, *liked.tolist(), *disliked.tolist()]
        values = [*rng.choice([4.0, 5.0], 1 + LIKED), *rng.choice([1.0, 2.0], DISLIKED)]
        # distinct instants per user, so every event has its own point in time
        instants = np.sort(rng.choice(span_us, len(chosen), replace=False))
        order = rng.permutation(len(chosen))
        rows += [(user, int(chosen[j]), float(values[j]), int(instants[k]))
                 for k, j in enumerate(order)]
    start_us = int(START.timestamp() * 1e6)
    events = pl.DataFrame(
        {
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "event_type": ["rating"] * len(rows),
            "value": [r[2] for r in rows],
            "event_timestamp": [start_us + r[3] for r in rows],
        },
        schema_overrides={"event_timestamp": pl.Int64},
    ).with_columns(pl.col("event_timestamp").cast(pl.Datetime("us")).dt.replace_time_zone("UTC"))
    events = events.select(pl.col(c).cast(t) for c, t in tables.EVENTS_SCHEMA.items())
    return SyntheticCatalogue(events.sort("event_timestamp", "user_id"), items, user_cluster,
                              item_cluster)


def item_vectors(data: ContractData, dim: int = 8, every: int = 1, seed: int = 3) -> ItemVectors:
    """Content vectors with ``data``'s planted structure: the item's cluster centre plus noise
    (an item in no cluster: the mean of the centres); ``every`` > 1 leaves items out (only
    every ``every``-th id of the sorted catalogue has a vector), for the missing-vector paths."""
    assert data.answer is not None, "vectors with a planted structure need generated data"
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(GENRES), dim))
    ids = np.sort(data.items["item_id"].to_numpy())[::every]
    clusters = data.answer.item_cluster
    base = np.stack([centres[clusters[int(i)]] if int(i) in clusters else centres.mean(axis=0)
                     for i in ids])
    vectors = base + 0.3 * rng.normal(size=base.shape)
    return ItemVectors(ids, vectors.astype(np.float32), f"synthetic-clusters-{every}")


def write_offline(data: SyntheticCatalogue, offline: Path) -> Path:
    """The offline tables of ``data`` under ``offline``: ``events``, ``items`` and the
    behaviour features (``user_behaviour``, ``item_behaviour``, ``user_history``) as
    ``avrec features`` writes them, computed as of the end of 2017."""
    offline.mkdir(parents=True, exist_ok=True)
    data.events.write_parquet(tables.table_path("events", offline))
    data.items.write_parquet(tables.table_path("items", offline))
    as_of = datetime(2018, 1, 1, tzinfo=UTC)
    behaviour_features.build(offline, as_of=as_of)
    return offline


@contextmanager
def _data_dir(path: Path) -> Iterator[None]:
    before = os.environ.get("AVREC_DATA_DIR")
    os.environ["AVREC_DATA_DIR"] = str(path)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("AVREC_DATA_DIR", None)
        else:
            os.environ["AVREC_DATA_DIR"] = before


def synthetic_store(data: SyntheticCatalogue, data_dir: Path) -> FeatureStore:
    """avrec's feature repo applied over ``data``'s offline tables in ``data_dir``.

    ``data_dir`` stands in for ``AVREC_DATA_DIR`` while the repo is applied (its sources'
    paths and the registry are resolved from it), so the session's own data directory (the
    real dataset's tier) is left alone. Only the registry and the offline store are used: the
    models read features as of a cut through :func:`avrec.pit_join.join_features_duckdb`,
    never the online store.
    """
    from avrec import config
    from avrec import feature_store as fs

    with _data_dir(data_dir):
        write_offline(data, config.offline_dir())
        fs.apply()
        return fs.get_store()
