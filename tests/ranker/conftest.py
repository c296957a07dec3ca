"""Fixtures for the ranker tests: the real MovieLens ml-latest-small, ingested once."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from avrec import config, tables
from avrec.ingest_movielens import ingest_movielens
from avrec.ranker.splits import Split, per_user_split
from tests.recommender_contract import ContractData, contract_slice

MOVIELENS = config.datasets_dir() / "ml-latest-small"


@pytest.fixture(scope="session")
def ml_offline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Offline tables of the real ml-latest-small (events + items), in a private directory."""
    if not MOVIELENS.is_dir():
        pytest.fail(f"dataset missing: {MOVIELENS} (see shared/datasets/README.md)")
    out = tmp_path_factory.mktemp("ranker_offline")
    ingest_movielens(MOVIELENS, out)
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


@pytest.fixture(scope="session")
def contract_data(ml_split: Split, ml_items: pl.DataFrame) -> ContractData:
    """The data of the shared recommender contract (:mod:`tests.recommender_contract`)."""
    return contract_slice(ml_split.train, ml_items)
