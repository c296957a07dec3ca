"""Open avrec's Feast repository from any working directory, apply and materialize it.

``feature_repo/feature_store.yaml`` is what ``cd feature_repo && feast ...`` reads. This
module loads the same file and pins every path that Feast would resolve against the
working directory: the SQL registry goes to ``config.registry_path()`` and the online
store to ``REDIS_URL``. ``import feast`` costs seconds, so it happens here, not at
``import avrec``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from avrec import config
from avrec.redis_server import feast_connection_string, feast_redis_type

if TYPE_CHECKING:
    from feast import FeatureStore
    from feast.repo_config import RepoConfig

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def repo_config(redis_url: str | None = None) -> RepoConfig:
    """The repo's ``feature_store.yaml`` with absolute registry path and Redis from config."""
    from feast.repo_config import RepoConfig

    raw = yaml.safe_load(
        os.path.expandvars((config.FEATURE_REPO / "feature_store.yaml").read_text())
    )
    config.data_dir().mkdir(parents=True, exist_ok=True)
    raw["registry"]["path"] = f"sqlite:///{config.registry_path()}"
    url = redis_url or config.redis_url()
    raw["online_store"]["connection_string"] = feast_connection_string(url)
    raw["online_store"]["redis_type"] = feast_redis_type(url)
    repo = RepoConfig(**raw)
    repo.repo_path = config.FEATURE_REPO
    return repo


def get_store(redis_url: str | None = None) -> FeatureStore:
    """A FeatureStore on avrec's repo, usable from any working directory."""
    from feast import FeatureStore

    return FeatureStore(repo_path=str(config.FEATURE_REPO), config=repo_config(redis_url))


@contextlib.contextmanager
def _cwd(path: Path):
    before = Path.cwd()
    try:
        yield
    finally:
        os.chdir(before)


def apply(redis_url: str | None = None) -> None:
    """``feast apply`` on avrec's repo (creates or updates every definition, drops stale ones)."""
    from feast.repo_operations import apply_total

    if str(config.FEATURE_REPO) not in sys.path:  # as the feast CLI does
        sys.path.append(str(config.FEATURE_REPO))
    # Feast imports the repo's files as modules; drop earlier imports so the sources' paths
    # follow the current AVREC_DATA_DIR (a process may apply for several data directories).
    for path in config.FEATURE_REPO.glob("*.py"):
        sys.modules.pop(path.stem, None)
    with _cwd(config.FEATURE_REPO):
        apply_total(repo_config(redis_url), config.FEATURE_REPO, skip_source_validation=False)


def materialization_key(project: str) -> str:
    """The Redis key :func:`materialize` bumps after writing a view; servers read it with each
    request to know when their in-process item snapshot is stale."""
    return f"avrec:{project}:materialization"


def bump_materialization(store: FeatureStore, redis_url: str | None = None) -> int:
    """Increment the materialization counter in the online store; returns its new value."""
    from avrec.redis_client import connect

    client = connect(redis_url or config.redis_url())
    try:
        return int(client.incr(materialization_key(store.config.project)))
    finally:
        client.close()


def reset_online(store: FeatureStore, redis_url: str | None = None) -> None:
    """Delete every feature view's rows from the online store (Feast's ``delete_table``).

    Follow it with ``materialize(start=EPOCH, end=...)`` to rebuild the online state as of
    ``end`` (e.g. a replay clock): Feast never overwrites a stored row with an older one, so
    without a reset rows newer than ``end`` would stay.
    """
    online = store._get_provider().online_store
    for view in store.list_feature_views():
        online.delete_table(store.config, view)
    bump_materialization(store, redis_url)


def materialize(
    end: datetime | None = None,
    start: datetime | None = None,
    views: list[str] | None = None,
    redis_url: str | None = None,
    store: FeatureStore | None = None,
) -> FeatureStore:
    """Load the latest offline row per entity with event time in ``[start, end]`` into Redis.

    Without ``start`` this is incremental: from the last materialization of each view (the
    first run starts at the epoch, so historical datasets load whole, not just one TTL).
    Afterwards the materialization counter is bumped (:func:`bump_materialization`).
    ``store``: the Feast store to materialize through (default: the repo's, local engine).
    """
    store = store or get_store(redis_url)
    end = end or datetime.now(UTC)
    for view in store.list_feature_views():
        if views and view.name not in views:
            continue
        if not Path(view.batch_source.path).exists():
            print(f"skipping {view.name}: {view.batch_source.path} not written yet")
            continue
        since = start or max((iv[1] for iv in view.materialization_intervals), default=EPOCH)
        store.materialize(start_date=since, end_date=end, feature_views=[view.name])
    bump_materialization(store, redis_url)
    return store
