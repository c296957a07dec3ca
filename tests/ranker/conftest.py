"""Fixtures for the ranker tests: the real MovieLens ml-latest-small, ingested once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from avrec import config, ingest, tables
from ranker.splits import Split, per_user_split

MOVIELENS = config.datasets_dir() / "ml-latest-small"


@pytest.fixture(scope="session")
def ml_offline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Offline tables of the real ml-latest-small (events + items), in a private directory."""
    if not MOVIELENS.is_dir():
        pytest.fail(f"dataset missing: {MOVIELENS} (see shared/datasets/README.md)")
    out = tmp_path_factory.mktemp("ranker_offline")
    ingest.ingest_movielens(MOVIELENS, out)
    return out


@pytest.fixture(scope="session")
def ml_events(ml_offline: Path) -> pl.DataFrame:
    return tables.read_table("events", ml_offline)


@pytest.fixture(scope="session")
def ml_items(ml_offline: Path) -> pl.DataFrame:
    return tables.read_table("items", ml_offline)


@pytest.fixture(scope="session")
def ml_split(ml_events: pl.DataFrame) -> Split:
    return per_user_split(ml_events)


@dataclass(frozen=True)
class ContractData:
    """Real training interactions (a slice of users) and the whole real catalogue."""

    train: pl.DataFrame
    items: pl.DataFrame
    users: np.ndarray  # users with history, in an unsorted order


@pytest.fixture(scope="session")
def contract_data(ml_split: Split, ml_items: pl.DataFrame) -> ContractData:
    users = np.sort(ml_split.train["user_id"].unique().to_numpy())[:150]
    train = ml_split.train.filter(pl.col("user_id").is_in(users.tolist()))
    order = np.random.default_rng(0).permutation(users.size)[:40]
    return ContractData(train, ml_items, users[order])
