"""Point-in-time feature joins run natively in DuckDB, with Feast's semantics.

:func:`join_features_duckdb` is a drop-in for ``training_set.join_features_feast``: same
columns, names, dtypes and row order, identical values. It reads the feature service's
views from the Feast registry and runs, per view, one DuckDB ``ASOF LEFT JOIN``:

* feature rows are matched on the view's join keys (through the projection's
  ``join_key_map``) with ``feature_ts <= lookup_ts``, where ``lookup_ts`` is the label
  time minus ``training_set.FEATURE_LAG`` (1 µs): the latest row wins;
* among rows sharing (keys, feature_ts) the latest ``created_timestamp`` wins (a missing
  one loses), as in Feast's ``deduplicate``: when a view's created times vary, the ASOF
  inequality compares the struct (feature_ts, created) with (lookup_ts, +infinity), so
  no separate deduplication pass is needed;
* with a TTL, the view's features are null when ``lookup_ts - feature_ts > ttl``
  (exactly ``ttl`` old is kept, as in Feast's ``feature_ts + ttl >= entity_ts``);
* labels without a matching row get nulls (left join);
* ``days_since_last_interaction`` and ``item_age_days`` are derived as
  ``training_set._derive_ages`` does (see :data:`DERIVED_AGES`).

Only views over Parquet ``FileSource``\\ s are supported (what avrec's repo uses).

:func:`write_training_set_duckdb` runs the same query as ``COPY ... TO`` a Parquet file,
so millions of rows never pass through Python. ``versioned_views`` keeps big vectors out
of the rows: for such a view the training set carries one column
``<view>__<timestamp_field>``, the event time of the feature row used (null when none or
expired), and the view's deduplicated rows go once to a side table keyed by the same
entity columns and that version column; ``train.join(side, on=[*entity_columns,
version_column], how="left")`` restores the inline columns.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import polars as pl

from avrec.names import DAY_US
from avrec.training_set import FEATURE_LAG, TrainingSetError

if TYPE_CHECKING:
    from feast import FeatureStore

LABEL_TIME = "label_timestamp"
# Ages in days derived at the label time from timestamp features, bit-identical to
# training_set._derive_ages: polars divides by a scalar as a product with its reciprocal.
DERIVED_AGES: dict[str, str] = {
    "days_since_last_interaction": "user_behaviour__last_interaction_at",
    "item_age_days": "item_behaviour__first_interaction_at",
}
_ROW = "__row"
_LOOKUP = "__lookup"
_TS = "__ts"
_ORDER = "__order"


@dataclass(frozen=True)
class ViewPlan:
    """What one feature view of a service contributes, resolved from the Feast registry."""

    name: str
    prefix: str
    path: str
    timestamp_field: str
    created_field: str | None
    ttl: timedelta | None
    key_map: dict[str, str]
    features: list[str]
    source_columns: dict[str, str]

    def source(self, column: str) -> str:
        """Column of the Parquet file behind ``column`` (Feast's ``field_mapping``)."""
        return self.source_columns.get(column, column)

    @property
    def version_column(self) -> str:
        """Output column holding the event time of the feature row used."""
        return f"{self.prefix}__{self.timestamp_field}"

    def output_columns(self, versioned: bool) -> list[str]:
        """The training-set columns this view adds."""
        if versioned:
            return [self.version_column]
        return [f"{self.prefix}__{f}" for f in self.features]


@dataclass(frozen=True)
class WrittenTrainingSet:
    """Files written by :func:`write_training_set_duckdb`."""

    path: Path
    side_tables: dict[str, Path]


def plan_views(store: FeatureStore, service: str) -> list[ViewPlan]:
    """The service's feature views, in the service's order, as :class:`ViewPlan`\\ s."""
    from feast.infra.offline_stores.file_source import FileSource

    plans = []
    for projection in store.get_feature_service(service).feature_view_projections:
        if projection.version_tag is not None:
            raise TrainingSetError(f"{projection.name}: versioned feature views are unsupported")
        view = store.get_feature_view(projection.name)
        source = view.batch_source
        if not isinstance(source, FileSource):
            raise TrainingSetError(f"{view.name}: only FileSource batch sources are supported")
        inverse = {new: old for old, new in source.field_mapping.items()}
        plans.append(
            ViewPlan(
                name=view.name,
                prefix=projection.name_alias or view.name,
                path=source.path,
                timestamp_field=source.timestamp_field,
                created_field=source.created_timestamp_column or None,
                ttl=view.ttl or None,
                key_map=dict(projection.join_key_map)
                or {c.name: c.name for c in view.entity_columns},
                features=[f.name for f in projection.features],
                source_columns=inverse,
            )
        )
    return plans


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _feature_rows(plan: ViewPlan, features: bool = True, order: bool = False) -> str:
    """Rows of one view: its join keys, ``__ts`` (UTC), optionally the features (full names)
    and ``__order``, the struct (event time, created time) that ranks rows as Feast does."""
    ts = f"CAST({_q(plan.source(plan.timestamp_field))} AS TIMESTAMPTZ)"
    cols = [f"{_q(plan.source(k))} AS {_q(k)}" for k in plan.key_map]
    cols.append(f"{ts} AS {_TS}")
    if features:
        cols += [f"{_q(plan.source(f))} AS {_q(plan.prefix + '__' + f)}" for f in plan.features]
    if order:
        cols.append(f"{{'t': {ts}, 'c': {_created(plan)}}} AS {_ORDER}")
    return f"SELECT {', '.join(cols)} FROM read_parquet({_lit(plan.path)}) WHERE {ts} IS NOT NULL"


def _created(plan: ViewPlan) -> str:
    """The created timestamp, a missing one ranking below any other (Feast: DESC NULLS LAST)."""
    if not plan.created_field:
        return "'-infinity'::TIMESTAMPTZ"
    created = f"CAST({_q(plan.source(plan.created_field))} AS TIMESTAMPTZ)"
    return f"coalesce({created}, '-infinity'::TIMESTAMPTZ)"


def _deduplicated(plan: ViewPlan) -> str:
    """One row per (join keys, ``__ts``): the latest created, as Feast's ``deduplicate``."""
    keys = ", ".join(_q(k) for k in plan.key_map)
    return (
        f"SELECT * EXCLUDE ({_ORDER}) FROM ({_feature_rows(plan, order=True)}) "
        f"QUALIFY row_number() OVER (PARTITION BY {keys}, {_TS} ORDER BY {_ORDER} DESC) = 1"
    )


def _view_columns(plan: ViewPlan, alias: str, versioned: bool) -> dict[str, str]:
    """Output column -> select expression for one view, null when the row is too old."""
    cols = {plan.version_column: f"{alias}.{_TS}"} if versioned else {
        c: f"{alias}.{_q(c)}" for c in plan.output_columns(False)
    }
    if plan.ttl is None:
        return cols
    ttl_us = plan.ttl // timedelta(microseconds=1)
    fresh = f"epoch_us(l.{_LOOKUP}) - epoch_us({alias}.{_TS}) <= {ttl_us}"
    return {name: f"CASE WHEN {fresh} THEN {expr} END" for name, expr in cols.items()}


def created_varies(con: duckdb.DuckDBPyConnection, plan: ViewPlan) -> bool:
    """Whether the view's created timestamps take more than one value (null counts as one).

    When they do not, rows tied on event time are tied on created time too, Feast keeps an
    arbitrary one of them, and a plain ASOF join on event time has the same semantics.
    """
    if not plan.created_field:
        return False
    created = f"CAST({_q(plan.source(plan.created_field))} AS TIMESTAMPTZ)"
    [(rows, known, low, high)] = con.execute(
        f"SELECT count(*), count({created}), min({created}), max({created}) "
        f"FROM read_parquet({_lit(plan.path)})"
    ).fetchall()
    return known > 0 and (known < rows or low != high)


def _tie_break_views(
    con: duckdb.DuckDBPyConnection, plans: list[ViewPlan], versioned_views: Collection[str]
) -> list[str]:
    return [p.name for p in plans if p.name not in versioned_views and created_varies(con, p)]


def training_set_sql(
    plans: list[ViewPlan],
    label_columns: list[str],
    versioned_views: Collection[str] = (),
    tie_break_views: Collection[str] | None = None,
    labels_table: str = "labels",
) -> str:
    """One query: the labels (with ``__row``) ASOF-joined to every view, in label order.

    ``label_columns`` are the label columns to carry through (the in-memory path carries
    none and stacks the result next to the labels in Python). ``tie_break_views`` are the
    views whose event-time ties are broken by created time (default: every view with a
    created timestamp column; see :func:`created_varies`).
    """
    unknown = set(versioned_views) - {p.name for p in plans}
    if unknown:
        raise TrainingSetError(f"versioned_views not in the service: {sorted(unknown)}")
    lag_us = FEATURE_LAG // timedelta(microseconds=1)
    ctes = [
        f"l AS (SELECT *, CAST({_q(LABEL_TIME)} AS TIMESTAMPTZ)"
        f" - INTERVAL {lag_us} MICROSECOND AS {_LOOKUP} FROM {labels_table})"
    ]
    joins, produced = [], {}
    for i, plan in enumerate(plans):
        alias, versioned = f"v{i}", plan.name in versioned_views
        ties = not versioned and (
            bool(plan.created_field) if tie_break_views is None else plan.name in tie_break_views
        )
        ctes.append(f"{alias} AS ({_feature_rows(plan, not versioned, ties)})")
        on = [f"l.{_q(label_col)} = {alias}.{_q(key)}" for key, label_col in plan.key_map.items()]
        if not ties:
            on.append(f"l.{_LOOKUP} >= {alias}.{_TS}")
        else:
            # The latest (event, created) time at or before the lookup: ASOF's inequality
            # breaks event-time ties by created time, so no separate deduplication pass.
            on.append(f"{{'t': l.{_LOOKUP}, 'c': 'infinity'::TIMESTAMPTZ}} >= {alias}.{_ORDER}")
        joins.append(f"ASOF LEFT JOIN {alias} ON {' AND '.join(on)}")
        produced.update(_view_columns(plan, alias, versioned))
    for age, source in DERIVED_AGES.items():
        if source in produced:
            since = f"epoch_us(l.{_q(LABEL_TIME)}) - epoch_us({produced[source]})"
            produced[age] = f"CAST({since} AS DOUBLE) * {1 / DAY_US!r}"
    select = [f"l.{_q(c)}" for c in label_columns]
    select += [f"{expr} AS {_q(name)}" for name, expr in produced.items()]
    return (
        f"WITH {', '.join(ctes)} "
        f"SELECT {', '.join(select)} FROM l {' '.join(joins)} ORDER BY l.{_ROW}"
    )


@contextmanager
def _connect(memory_limit: str | None, threads: int | None) -> Iterator[duckdb.DuckDBPyConnection]:
    spill = tempfile.mkdtemp(prefix="avrec_pit_")
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.execute(f"SET temp_directory = {_lit(spill)}")
        if memory_limit:
            con.execute(f"SET memory_limit = {_lit(memory_limit)}")
        if threads:
            con.execute(f"SET threads = {int(threads)}")
        yield con
    finally:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)


def _check_labels(labels: pl.DataFrame, plans: list[ViewPlan]) -> None:
    needed = {LABEL_TIME} | {c for p in plans for c in p.key_map.values()}
    missing = sorted(needed - set(labels.columns))
    if missing:
        raise TrainingSetError(f"labels lack column(s) {missing}")
    if labels.get_column(LABEL_TIME).null_count():
        raise TrainingSetError(f"labels have null {LABEL_TIME}")
    clash = [c for c in labels.columns if c.startswith("__")]
    if clash:
        raise TrainingSetError(f"label columns may not start with '__': {clash}")


def join_features_duckdb(
    labels: pl.DataFrame,
    store: FeatureStore,
    service: str,
    memory_limit: str | None = None,
    threads: int | None = None,
) -> pl.DataFrame:
    """Features of ``service`` as of each label, in label order (cf. ``join_features_feast``).

    Returns the labels, then ``<view>__<feature>`` columns per view in the service's order,
    then the derived ages of :data:`DERIVED_AGES`.
    """
    plans = plan_views(store, service)
    _check_labels(labels, plans)
    keys = sorted({LABEL_TIME} | {c for p in plans for c in p.key_map.values()})
    narrow = labels.select(keys).with_row_index(_ROW).to_arrow()
    with _connect(memory_limit, threads) as con:
        con.register("labels", narrow)
        sql = training_set_sql(plans, [], tie_break_views=_tie_break_views(con, plans, ()))
        features = con.sql(sql).pl()
    return pl.concat([labels, features], how="horizontal")


def side_table_path(path: Path, view: str) -> Path:
    """Where :func:`write_training_set_duckdb` puts ``view``'s side table."""
    return path.with_name(f"{path.stem}.{view}{path.suffix}")


def write_training_set_duckdb(
    labels: pl.DataFrame,
    store: FeatureStore,
    service: str,
    path: Path,
    versioned_views: Collection[str] = (),
    memory_limit: str | None = None,
    threads: int | None = None,
) -> WrittenTrainingSet:
    """Write the training set straight from DuckDB to Parquet (atomic rename at the end).

    The result is never materialised in Python. ``memory_limit`` is DuckDB's (default: 80%
    of RAM), beyond which it spills to a temporary directory; rows carrying big vectors
    inline need room to sort, so bound memory with ``versioned_views`` (1M rows with a
    384-d embedding, process peak: ~1.7 GB with ``"800MB"`` versioned, ~3.2-3.6 GB with
    ``"2GB"`` inline, which fails at ``"1GB"``). The file holds what
    :func:`join_features_duckdb` returns, the versioned views' features replaced by their
    version column.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plans = plan_views(store, service)
    _check_labels(labels, plans)
    side_tables: dict[str, Path] = {}
    with _connect(memory_limit, threads) as con:
        ties = _tie_break_views(con, plans, versioned_views)
        sql = training_set_sql(plans, labels.columns, versioned_views, ties)
        con.register("labels", labels.with_row_index(_ROW).to_arrow())
        for i, plan in enumerate(p for p in plans if p.name in versioned_views):
            side = side_table_path(path, plan.name)
            rows = (
                f"SELECT {', '.join(_q(k) + ' AS ' + _q(v) for k, v in plan.key_map.items())}, "
                f"{_TS} AS {_q(plan.version_column)}, "
                f"{', '.join(_q(c) for c in plan.output_columns(False))} "
                f"FROM ({_deduplicated(plan)}) AS s{i}"
            )
            _copy(con, rows, side)
            side_tables[plan.name] = side
        _copy(con, sql, path)
    return WrittenTrainingSet(path=path, side_tables=side_tables)


def _copy(con: duckdb.DuckDBPyConnection, query: str, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    con.execute(f"COPY ({query}) TO {_lit(str(tmp))} (FORMAT parquet, COMPRESSION zstd)")
    tmp.replace(path)
