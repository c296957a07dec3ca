"""The DuckDB point-in-time join against Feast and against a brute-force oracle.

Real data: a few thousand MovieLens labels through avrec's own repo, both engines, value
by value. Hand-built edge cases: a small Feast repo of its own (SQLite registry and online
store under tmp_path), every case through Feast, DuckDB and a Python oracle that scans
every feature row for every label.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import polars.selectors as cs
import pytest

from avrec import behaviour_features, config, pit_join, tables
from avrec import training_set as ts

US = timedelta(microseconds=1)
T0 = datetime(2020, 1, 10, tzinfo=UTC)
CREATED = datetime(2020, 2, 1, tzinfo=UTC)
EDGE_TTL = timedelta(days=1)
REAL_SPEC = ts.TrainingSetSpec(
    start=datetime(2010, 1, 1, tzinfo=UTC),
    end=datetime(2019, 1, 1, tzinfo=UTC),
    negatives=3,
    feature_service="behaviour_features",
)


def assert_identical(got: pl.DataFrame, want: pl.DataFrame) -> None:
    """Same columns, dtypes, row order and values (floats exact, lists element-wise)."""
    assert got.columns == want.columns
    assert got.schema == want.schema
    assert got.height == want.height
    for name in want.columns:
        same = got[name].eq_missing(want[name])
        if not same.all():
            bad = (~same).arg_true()[:3].to_list()
            raise AssertionError(
                f"{name}: {(~same).sum()} rows differ, e.g. rows {bad}: "
                f"got {got[name].gather(bad).to_list()} want {want[name].gather(bad).to_list()}"
            )


# --- real data ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_labels(movielens_offline: Path) -> pl.DataFrame:
    events = tables.read_table("events", movielens_offline)
    items = tables.read_table("items", movielens_offline)
    labels = ts.build_labels(events, items, REAL_SPEC)
    return labels.sample(3000, seed=7, shuffle=True)  # shuffled: row order must survive


@pytest.fixture(scope="module")
def real_feast(real_labels: pl.DataFrame, feature_store) -> pl.DataFrame:
    return ts.join_features_feast(real_labels, feature_store, REAL_SPEC.feature_service)


def test_real_data_identical_to_feast(real_labels, real_feast, feature_store) -> None:
    got = pit_join.join_features_duckdb(real_labels, feature_store, REAL_SPEC.feature_service)
    assert_identical(got, real_feast)
    features = real_feast.select(cs.starts_with("user_behaviour__", "item_behaviour__"))
    # The sample exercises hits, misses and lists, not only nulls.
    assert 0 < real_feast["user_behaviour__interactions_all"].null_count() < real_feast.height
    assert real_feast["user_behaviour__recent_items"].drop_nulls().list.len().max() > 1
    assert features.width == 16


def test_real_data_streamed_to_parquet(real_labels, real_feast, feature_store, tmp_path) -> None:
    written = pit_join.write_training_set_duckdb(
        real_labels, feature_store, REAL_SPEC.feature_service, tmp_path / "train.parquet",
        memory_limit="500MB",
    )
    assert written.side_tables == {}
    assert_identical(pl.read_parquet(written.path), real_feast)


def test_real_data_versioned_view_restores_inline(
    real_labels, real_feast, feature_store, tmp_path
) -> None:
    written = pit_join.write_training_set_duckdb(
        real_labels, feature_store, REAL_SPEC.feature_service, tmp_path / "train.parquet",
        versioned_views=["user_behaviour"],
    )
    train = pl.read_parquet(written.path)
    assert "user_behaviour__genre_affinity" not in train.columns
    side = pl.read_parquet(written.side_tables["user_behaviour"])
    assert side.columns[:2] == ["user_id", "user_behaviour__event_timestamp"]
    restored = train.join(
        side, on=["user_id", "user_behaviour__event_timestamp"], how="left", maintain_order="left"
    )
    want = real_feast.drop("days_since_last_interaction")
    assert_identical(restored.select(want.columns), want)


# --- hand-built edge cases -----------------------------------------------------------------


@dataclass(frozen=True)
class View:
    """What the oracle needs to know about a view (written independently of pit_join)."""

    prefix: str
    rows: pl.DataFrame
    keys: dict[str, str]  # view join key -> label column
    ttl: timedelta | None
    features: list[str]
    created: str | None = "created_timestamp"


def _ts(*values: datetime | None) -> pl.Series:
    return pl.Series(values, dtype=tables.TS)


# ub: TTL 1 day, created timestamps, an Int64, a vector, a string and a bool feature.
# Rows are listed in an order that makes "first row wins" or "last row wins" fail.
UB_ROWS = pl.DataFrame(
    {
        "user_id": [1, 1, 2, 2, 2, 3, 3, 4, 4, 6, 6, 5],
        "event_timestamp": _ts(
            T0 - US,  # user 1: exactly at the lookup time of a label at T0 -> used
            T0,  # user 1: at the label's own time -> never used for that label
            T0 - timedelta(hours=1),  # user 2: three rows at one event time ...
            T0 - timedelta(hours=1),
            T0 - timedelta(hours=1),
            T0 - US - EDGE_TTL,  # user 3: exactly ttl old at lookup T0 - 1us
            T0 - US - EDGE_TTL - timedelta(hours=5),
            T0 + timedelta(hours=1),  # user 4: a future row ...
            T0 - timedelta(hours=2),  # ... and a past one
            T0 - timedelta(days=2),  # user 6: latest past row expired
            T0 + timedelta(minutes=1),  # ... and a future one that must not replace it
            None,  # user 5: a row without event time never matches
        ),
        "created_timestamp": _ts(
            CREATED, CREATED,
            CREATED, CREATED + timedelta(days=1), None,  # ... the latest created wins
            CREATED, CREATED, CREATED, CREATED, CREATED, CREATED, CREATED,
        ),
        "value": [1, 2, 10, 11, 12, 30, 31, 40, 41, 60, 61, 50],
        "vec": [[float(v), v + 0.5] for v in [1, 2, 10, 11, 12, 30, 31, 40, 41, 60, 61, 50]],
        "tag": ["a", "b", "c", "d", None, "f", "g", "h", "i", "j", "k", "l"],
        "flag": [True, False, True, False, True, None, False, True, False, True, False, True],
    },
    schema_overrides={"vec": pl.List(pl.Float32), "value": pl.Int64},
)
# ib: no TTL, no created timestamp.
IB_ROWS = pl.DataFrame(
    {
        "item_id": [100, 100, 101, 102],
        "event_timestamp": _ts(
            T0 - timedelta(days=400), T0 + timedelta(days=1), T0, T0 - timedelta(days=9000)
        ),
        "score": [1.5, 2.5, 3.5, 4.5],
    }
)
# Labels, with what ub__value / ib__score must be (None: no valid row).
EDGE_LABELS = [
    # user, item, label time, ub__value, ib__score
    (1, 100, T0, 1, 1.5),  # row exactly at lookup used; the row at label time not
    (1, 101, T0 + US, 2, 3.5),  # one microsecond later both rows at T0 are visible
    (2, 101, T0, 11, None),  # tie on event time: latest created wins; item row at T0 unseen
    (3, 102, T0, 30, 4.5),  # exactly ttl old: kept; no ttl on ib: 24 years old is fine
    (3, 100, T0 + US, None, 1.5),  # ttl + 1us old: expired
    (4, 100, T0, 41, 1.5),  # future row never leaks
    (4, 102, T0 - timedelta(hours=3), None, 4.5),  # only future rows for the user
    (5, 103, T0, None, None),  # unknown user and item
    (6, 100, T0, None, 1.5),  # latest past row expired; the future row stays unseen
]


def _labels(rows: list[tuple]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "label_timestamp": _ts(*(r[2] for r in rows)),
            "label": pl.Series([1] * len(rows), dtype=pl.Int8),
            "sample_type": ["positive"] * len(rows),
        }
    )


def oracle(labels: pl.DataFrame, views: list[View]) -> pl.DataFrame:
    """Brute force: for each label and view, scan every feature row and keep the latest
    valid one by (event time, created time); None when there is none."""
    out: dict[str, list] = {}
    for view in views:
        rows = view.rows.to_dicts()
        for name in view.features:
            out[f"{view.prefix}__{name}"] = []
        for label in labels.iter_rows(named=True):
            lookup = label["label_timestamp"] - ts.FEATURE_LAG
            best, best_rank = None, None
            for row in rows:
                event = row["event_timestamp"]
                if any(row[k] != label[c] for k, c in view.keys.items()) or event is None:
                    continue
                if event > lookup or (view.ttl is not None and event + view.ttl < lookup):
                    continue
                created = row[view.created] if view.created else None
                rank = (event, created is not None, created or event)
                if best_rank is None or rank > best_rank:
                    best, best_rank = row, rank
            for name in view.features:
                out[f"{view.prefix}__{name}"].append(None if best is None else best[name])
    return pl.DataFrame(out, schema={
        f"{v.prefix}__{n}": v.rows.schema[n] for v in views for n in v.features
    })


@dataclass(frozen=True)
class EdgeRepo:
    """The hand-built Feast repo and the oracle's view of it."""

    store: object
    edge: list[View]
    aliased: list[View]
    behaviour: list[View]
    events: pl.DataFrame


def _source(name: str, path: Path, frame: pl.DataFrame, created: bool = True):
    from feast import FileSource

    frame.write_parquet(path)
    return FileSource(
        name=f"{name}_source", path=str(path), timestamp_field="event_timestamp",
        created_timestamp_column="created_timestamp" if created else "",
    )


def _tiny_events() -> pl.DataFrame:
    """User 7 rates item 100 then 101; user 8 rates 101 once."""
    rows = [
        (7, 100, "rating", 4.0, T0),
        (7, 101, "rating", 2.0, T0 + timedelta(hours=3)),
        (8, 101, "rating", 5.0, T0 + timedelta(days=2)),
    ]
    return pl.DataFrame(rows, schema=tables.EVENTS_SCHEMA, orient="row")


@pytest.fixture(scope="module")
def edge_repo(tmp_path_factory: pytest.TempPathFactory) -> EdgeRepo:
    from feast import Entity, FeatureService, FeatureStore, FeatureView, Field, ValueType
    from feast.repo_config import RepoConfig
    from feast.types import Array, Bool, Float32, Float64, Int64, String

    root = tmp_path_factory.mktemp("edge_repo")
    user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64)
    item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.INT64)
    ub = FeatureView(
        name="ub", entities=[user], ttl=EDGE_TTL, online=False,
        schema=[Field(name="value", dtype=Int64), Field(name="vec", dtype=Array(Float32)),
                Field(name="tag", dtype=String), Field(name="flag", dtype=Bool)],
        source=_source("ub", root / "ub.parquet", UB_ROWS),
    )
    ib = FeatureView(
        name="ib", entities=[item], online=False, schema=[Field(name="score", dtype=Float64)],
        source=_source("ib", root / "ib.parquet", IB_ROWS, created=False),
    )
    aliased = ib.with_name("ib_other").with_join_key_map({"item_id": "other_item"})

    # avrec's own behaviour views (schemas from feature_repo) over a tiny event log.
    events = _tiny_events()
    items = pl.DataFrame(
        {"item_id": [100, 101], "title": ["a", "b"], "year": [None, None],
         "genres": [["Drama"], ["Comedy", "Drama"]], "tags": [[], []],
         "description": [None, None], "image_path": [None, None]},
        schema=tables.ITEMS_SCHEMA,
    )
    built = behaviour_features.compute(events, items, as_of=T0 + timedelta(days=60),
                                       created=CREATED)
    sys.path.insert(0, str(config.FEATURE_REPO))
    import feature_views

    def clone(view: FeatureView, frame: pl.DataFrame, entity: Entity) -> FeatureView:
        source = _source(view.name, root / f"{view.name}.parquet", frame)
        return FeatureView(name=view.name, entities=[entity], ttl=view.ttl, online=False,
                           schema=view.schema, source=source)

    user_view = clone(feature_views.user_behaviour, built.user, user)
    item_view = clone(feature_views.item_behaviour, built.item, item)
    config_ = RepoConfig(
        project="pit_edge",
        provider="local",
        registry={"registry_type": "sql", "path": f"sqlite:///{root / 'registry.db'}"},
        offline_store={"type": "duckdb"},
        online_store={"type": "sqlite", "path": str(root / "online.db")},
        entity_key_serialization_version=3,
    )
    store = FeatureStore(config=config_)
    store.apply([
        user, item, ub, ib, user_view, item_view,
        FeatureService(name="edge", features=[ub, ib]),
        FeatureService(name="aliased", features=[aliased, ub[["value"]]]),
        FeatureService(name="behaviour", features=[user_view, item_view]),
    ])
    ub_features = ["value", "vec", "tag", "flag"]
    behaviour = [
        View(v.name, frame, {key: key}, v.ttl or None, [f.name for f in v.features])
        for v, frame, key in ((feature_views.user_behaviour, built.user, "user_id"),
                              (feature_views.item_behaviour, built.item, "item_id"))
    ]
    return EdgeRepo(
        store=store,
        edge=[View("ub", UB_ROWS, {"user_id": "user_id"}, EDGE_TTL, ub_features),
              View("ib", IB_ROWS, {"item_id": "item_id"}, None, ["score"], created=None)],
        aliased=[View("ib_other", IB_ROWS, {"item_id": "other_item"}, None, ["score"], None),
                 View("ub", UB_ROWS, {"user_id": "user_id"}, EDGE_TTL, ["value"])],
        behaviour=behaviour,
        events=events,
    )


@pytest.fixture(scope="module")
def edge_labels() -> pl.DataFrame:
    return _labels(EDGE_LABELS)


@pytest.fixture(scope="module")
def edge_feast(edge_repo: EdgeRepo, edge_labels: pl.DataFrame) -> pl.DataFrame:
    return ts.join_features_feast(edge_labels, edge_repo.store, "edge")


def test_edge_cases_expected_values(edge_feast: pl.DataFrame, edge_repo, edge_labels) -> None:
    duck = pit_join.join_features_duckdb(edge_labels, edge_repo.store, "edge")
    expected_value = [r[3] for r in EDGE_LABELS]
    expected_score = [r[4] for r in EDGE_LABELS]
    for frame in (edge_feast, duck, oracle(edge_labels, edge_repo.edge)):
        assert frame["ub__value"].to_list() == expected_value
        assert frame["ib__score"].to_list() == expected_score
    assert duck["ub__vec"].to_list()[:2] == [[1.0, 1.5], [2.0, 2.5]]


def test_edge_cases_feast_duckdb_oracle_agree(edge_feast, edge_repo, edge_labels) -> None:
    duck = pit_join.join_features_duckdb(edge_labels, edge_repo.store, "edge")
    assert_identical(duck, edge_feast)
    want = oracle(edge_labels, edge_repo.edge)
    assert_identical(duck.select(want.columns), want)


def test_row_order_of_labels_is_kept(edge_repo, edge_labels) -> None:
    shuffled = edge_labels.reverse()
    duck = pit_join.join_features_duckdb(shuffled, edge_repo.store, "edge")
    assert_identical(duck, ts.join_features_feast(shuffled, edge_repo.store, "edge"))
    assert duck["ub__value"].to_list() == [r[3] for r in reversed(EDGE_LABELS)]


def test_alias_join_key_map_and_feature_subset(edge_repo, edge_labels) -> None:
    labels = edge_labels.with_columns(other_item=pl.col("item_id").reverse())
    lookup = (pl.col("label_timestamp") - ts.FEATURE_LAG).alias("event_timestamp")
    entity_df = labels.select("user_id", "other_item", lookup).to_pandas()
    service = edge_repo.store.get_feature_service("aliased")
    job = edge_repo.store.get_historical_features(
        entity_df=entity_df, features=service, full_feature_names=True
    )
    feast = labels.join(
        pl.from_arrow(job.to_arrow()).with_columns(
            (pl.col("event_timestamp").dt.convert_time_zone("UTC").dt.cast_time_unit("us")
             + ts.FEATURE_LAG)
            .alias("label_timestamp")
        ).drop("event_timestamp"),
        on=["user_id", "other_item", "label_timestamp"], how="left", maintain_order="left",
    )
    duck = pit_join.join_features_duckdb(labels, edge_repo.store, "aliased")
    assert duck.columns == [*labels.columns, "ib_other__score", "ub__value"]
    assert_identical(duck, feast.select(duck.columns))
    want = oracle(labels, edge_repo.aliased)
    assert_identical(duck.select(want.columns), want)


def test_first_rating_sees_no_behaviour(edge_repo: EdgeRepo) -> None:
    spec = ts.TrainingSetSpec(start=T0 - timedelta(days=1), end=T0 + timedelta(days=30),
                              negatives=0, feature_service="behaviour")
    labels = ts.label_events(edge_repo.events, spec)
    duck = pit_join.join_features_duckdb(labels, edge_repo.store, "behaviour")
    assert_identical(duck, ts.join_features_feast(labels, edge_repo.store, "behaviour"))
    want = oracle(labels, edge_repo.behaviour)
    assert_identical(duck.select(want.columns), want)
    by_label = {(r["user_id"], r["item_id"]): r for r in duck.iter_rows(named=True)}
    first, second, only = by_label[(7, 100)], by_label[(7, 101)], by_label[(8, 101)]
    # A user's first-ever rating: no behaviour row yet, so all user features are null.
    assert first["user_behaviour__interactions_all"] is None
    assert first["user_behaviour__recent_items"] is None
    assert first["days_since_last_interaction"] is None
    # The second rating sees the first, never itself.
    assert second["user_behaviour__interactions_all"] == 1
    assert second["user_behaviour__recent_items"] == [100]
    assert second["days_since_last_interaction"] == pytest.approx(3 / 24)
    # Item 101's first rating by user 7 is in user 8's later label's item features.
    assert only["item_behaviour__popularity_all"] == 1
    assert only["user_behaviour__interactions_all"] is None


def test_streamed_and_versioned_outputs(edge_repo, edge_labels, edge_feast, tmp_path) -> None:
    path = tmp_path / "edge.parquet"
    inline = pit_join.write_training_set_duckdb(edge_labels, edge_repo.store, "edge", path)
    assert_identical(pl.read_parquet(inline.path), edge_feast)
    versioned = pit_join.write_training_set_duckdb(
        edge_labels, edge_repo.store, "edge", tmp_path / "v.parquet", versioned_views=["ub"]
    )
    train = pl.read_parquet(versioned.path)
    assert [c for c in train.columns if c.startswith("ub__")] == ["ub__event_timestamp"]
    # The version is the feature row's event time, null when none or expired.
    assert train["ub__event_timestamp"].to_list()[:3] == [
        T0 - US, T0, T0 - timedelta(hours=1)
    ]
    assert train["ub__event_timestamp"].null_count() == 4
    side = pl.read_parquet(versioned.side_tables["ub"])
    assert side.height == UB_ROWS.drop_nulls("event_timestamp").select(
        "user_id", "event_timestamp"
    ).n_unique()
    restored = train.join(side, on=["user_id", "ub__event_timestamp"], how="left",
                          maintain_order="left")
    assert_identical(restored.select(edge_feast.columns), edge_feast)


def test_created_time_tie_break_only_where_created_varies(edge_repo) -> None:
    import duckdb

    plans = {p.name: p for p in pit_join.plan_views(edge_repo.store, "edge")}
    plans |= {p.name: p for p in pit_join.plan_views(edge_repo.store, "behaviour")}
    with duckdb.connect() as con:
        varies = {name: pit_join.created_varies(con, plan) for name, plan in plans.items()}
    assert varies == {"ub": True, "ib": False, "user_behaviour": False, "item_behaviour": False}


def test_clear_errors(edge_repo, edge_labels, tmp_path) -> None:
    with pytest.raises(ts.TrainingSetError, match="lack column"):
        pit_join.join_features_duckdb(edge_labels.drop("item_id"), edge_repo.store, "edge")
    with pytest.raises(ts.TrainingSetError, match="not in the service"):
        pit_join.write_training_set_duckdb(
            edge_labels, edge_repo.store, "edge", tmp_path / "x.parquet", versioned_views=["nope"]
        )
    nulls = edge_labels.with_columns(pl.lit(None, dtype=tables.TS).alias("label_timestamp"))
    with pytest.raises(ts.TrainingSetError, match="null label_timestamp"):
        pit_join.join_features_duckdb(nulls, edge_repo.store, "edge")
