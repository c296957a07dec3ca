"""Point-in-time-correct training sets: labels from events, features through Feast.

A training set is one row per (user, item, label time) with

* ``label`` 1 for a rating >= ``positive_threshold``, 0 for a lower rating (an explicit
  negative) or a sampled negative,
* ``sample_type``: ``positive``, ``explicit_negative`` or ``sampled_negative``,
* every feature of the feature service as it was **just before the label** (features are
  looked up as of ``label_timestamp - 1 microsecond``, so the labelled event itself and
  anything else at the same instant is never a feature of its own label),
* ``days_since_last_interaction`` and ``item_age_days``, derived at the label time from
  ``last_interaction_at`` / ``first_interaction_at``.

Sampled negatives: ``negatives`` per positive, items the user had not interacted with at or
before the label time, drawn uniformly from the catalogue or proportionally to each item's
interaction count before the window end; seeded, so the same arguments give the same rows.

Rows are sorted by ``(label_timestamp, user_id, item_id)``; ids stay Int64 and list
features stay lists (results go through Arrow, never through ``to_df()``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import polars as pl

from avrec import tables
from avrec.errors import InputError
from avrec.names import DAY_US, DEFAULT_TRAINING_SET_ENGINE, RANKER_FEATURES

if TYPE_CHECKING:
    import pandas as pd
    from feast import FeatureStore

FEATURE_LAG = timedelta(microseconds=1)
FEATURE_SERVICE = RANKER_FEATURES
LABEL_COLUMNS = ["user_id", "item_id", "label_timestamp", "label", "sample_type"]
Sampling = Literal["uniform", "popularity"]
Engine = Literal["feast", "duckdb", "spark"]  # avrec.names.TRAINING_SET_ENGINES


class TrainingSetError(InputError):
    """The arguments describe no valid training set."""


@dataclass(frozen=True)
class TrainingSetSpec:
    """What to label and how to sample. Dates are UTC; the window is ``[start, end)``."""

    start: datetime
    end: datetime
    negatives: int = 4
    sampling: Sampling = "uniform"
    positive_threshold: float = 4.0
    explicit_negatives: bool = True
    seed: int = 0
    feature_service: str = FEATURE_SERVICE

    def __post_init__(self) -> None:
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise TrainingSetError("start and end must be timezone-aware (UTC)")
        if self.start >= self.end:
            raise TrainingSetError(f"empty window: start {self.start} >= end {self.end}")
        if self.negatives < 0:
            raise TrainingSetError(f"negatives must be >= 0, got {self.negatives}")
        if self.sampling not in ("uniform", "popularity"):
            raise TrainingSetError(f"sampling must be uniform or popularity, not {self.sampling!r}")


def label_events(events: pl.DataFrame, spec: TrainingSetSpec) -> pl.DataFrame:
    """Positive (and explicit negative) labels from rating events inside the window."""
    ratings = events.filter(
        (pl.col("event_type") == "rating")
        & (pl.col("event_timestamp") >= spec.start)
        & (pl.col("event_timestamp") < spec.end)
    )
    positive = pl.col("value") >= spec.positive_threshold
    if not spec.explicit_negatives:
        ratings = ratings.filter(positive)
    return ratings.select(
        "user_id",
        "item_id",
        pl.col("event_timestamp").alias("label_timestamp"),
        positive.cast(pl.Int8).alias("label"),
        pl.when(positive)
        .then(pl.lit("positive"))
        .otherwise(pl.lit("explicit_negative"))
        .alias("sample_type"),
    )


def _sampling_weights(events: pl.DataFrame, catalogue: np.ndarray, spec: TrainingSetSpec):
    if spec.sampling == "uniform":
        return None
    counts = events.filter(pl.col("event_timestamp") < spec.end).group_by("item_id").len()
    weights = (
        pl.DataFrame({"item_id": catalogue})
        .join(counts, on="item_id", how="left")
        .get_column("len")
        .fill_null(0)
        .to_numpy()
        .astype(np.float64)
    )
    if weights.sum() == 0:
        raise TrainingSetError("popularity sampling needs interactions before the window end")
    return weights / weights.sum()


def sample_negatives(
    positives: pl.DataFrame,
    events: pl.DataFrame,
    catalogue: np.ndarray,
    spec: TrainingSetSpec,
    max_rounds: int = 20,
) -> pl.DataFrame:
    """``spec.negatives`` items per positive that the user had not touched by its label time.

    Rows are drawn in rounds: each round draws candidates for the positives still short,
    drops items the user interacted with at or before the label time and items already
    chosen for the same (user, label time), and keeps the first ones in draw order.
    """
    k = spec.negatives
    if k == 0 or positives.is_empty():
        return pl.DataFrame(schema={c: positives.schema[c] for c in LABEL_COLUMNS})
    rng = np.random.default_rng(spec.seed)
    weights = _sampling_weights(events, catalogue, spec)
    first_touch = events.group_by("user_id", "item_id").agg(
        pl.col("event_timestamp").min().alias("first_touch")
    )
    anchors = positives.select("user_id", "label_timestamp").with_row_index("anchor")
    chosen = pl.DataFrame(schema={"anchor": pl.UInt32, "draw": pl.Int64, "item_id": pl.Int64})
    need = anchors.with_columns(pl.lit(k, pl.Int64).alias("missing"))
    for _ in range(max_rounds):
        if need.is_empty():
            break
        per_row = 2 * k + 4
        draws = rng.choice(len(catalogue), size=(need.height, per_row), p=weights)
        offset = chosen.height
        candidates = (
            pl.DataFrame(
                {
                    "anchor": np.repeat(need.get_column("anchor").to_numpy(), per_row),
                    "item_id": catalogue[draws].ravel(),
                }
            )
            .with_row_index("draw", offset=offset)
            .with_columns(pl.col("draw").cast(pl.Int64))
            .join(
                need.select("anchor", "user_id", "label_timestamp"),
                on="anchor",
                maintain_order="left",
            )
            .join(first_touch, on=["user_id", "item_id"], how="left")
            .filter(
                pl.col("first_touch").is_null()
                | (pl.col("first_touch") > pl.col("label_timestamp"))
            )
        )
        taken = chosen.join(anchors, on="anchor").select("user_id", "label_timestamp", "item_id")
        candidates = (
            candidates.join(taken, on=["user_id", "label_timestamp", "item_id"], how="anti")
            .sort("draw")
            .unique(["user_id", "label_timestamp", "item_id"], keep="first", maintain_order=True)
            .join(need.select("anchor", "missing"), on="anchor")
            .filter(pl.int_range(pl.len()).over("anchor") < pl.col("missing"))
        )
        chosen = pl.concat([chosen, candidates.select(chosen.columns)])
        have = chosen.group_by("anchor").len()
        need = (
            anchors.join(have, on="anchor", how="left")
            .with_columns((k - pl.col("len").fill_null(0)).cast(pl.Int64).alias("missing"))
            .filter(pl.col("missing") > 0)
            .drop("len")
        )
    if not need.is_empty():
        raise TrainingSetError(
            f"{need.height} positives could not get {k} negatives: catalogue too small for "
            f"users who touched most of it (lower --negatives)"
        )
    return chosen.join(anchors, on="anchor").select(
        "user_id",
        "item_id",
        "label_timestamp",
        pl.lit(0, pl.Int8).alias("label"),
        pl.lit("sampled_negative").alias("sample_type"),
    )


def build_labels(events: pl.DataFrame, items: pl.DataFrame, spec: TrainingSetSpec) -> pl.DataFrame:
    """All label rows (positives, explicit and sampled negatives) in the stable order."""
    labelled = label_events(events, spec)
    positives = labelled.filter(pl.col("label") == 1)
    catalogue = items.get_column("item_id").to_numpy()
    negatives = sample_negatives(positives, events, catalogue, spec)
    rows = pl.concat([labelled, negatives.select(labelled.columns)])
    return rows.unique(
        ["user_id", "item_id", "label_timestamp"], keep="first", maintain_order=True
    ).sort(["label_timestamp", "user_id", "item_id"])


def entity_frame(labels: pl.DataFrame) -> pd.DataFrame:
    """Feast's entity_df: ids and the feature lookup time (label time minus one microsecond)."""
    return labels.select(
        "user_id",
        "item_id",
        (pl.col("label_timestamp") - FEATURE_LAG).alias("event_timestamp"),
    ).to_pandas()


def _derive_ages(frame: pl.DataFrame) -> pl.DataFrame:
    label_ts = pl.col("label_timestamp")
    derived = []
    if "user_behaviour__last_interaction_at" in frame.columns:
        derived.append(
            (
                (label_ts - pl.col("user_behaviour__last_interaction_at")).dt.total_microseconds()
                / DAY_US
            ).alias("days_since_last_interaction")
        )
    if "item_behaviour__first_interaction_at" in frame.columns:
        derived.append(
            (
                (label_ts - pl.col("item_behaviour__first_interaction_at")).dt.total_microseconds()
                / DAY_US
            ).alias("item_age_days")
        )
    return frame.with_columns(derived)


def join_features_feast(labels: pl.DataFrame, store: FeatureStore, service: str) -> pl.DataFrame:
    """Features as of each label through Feast's ``get_historical_features`` (DuckDB store)."""
    features = store.get_feature_service(service)
    job = store.get_historical_features(
        entity_df=entity_frame(labels), features=features, full_feature_names=True
    )
    joined = pl.from_arrow(job.to_arrow())
    assert isinstance(joined, pl.DataFrame)
    joined = joined.with_columns(
        pl.col("event_timestamp").dt.convert_time_zone("UTC").dt.cast_time_unit("us") + FEATURE_LAG
    ).rename({"event_timestamp": "label_timestamp"})
    out = labels.join(
        joined, on=["user_id", "item_id", "label_timestamp"], how="left", maintain_order="left"
    )
    if out.height != labels.height:
        raise TrainingSetError("feature join changed the number of rows (duplicate entity rows)")
    return _derive_ages(out)


def _check_offline_data(store: FeatureStore, service: str) -> None:
    for projection in store.get_feature_service(service).feature_view_projections:
        view = store.get_feature_view(projection.name)
        if not Path(view.batch_source.path).exists():
            raise TrainingSetError(
                f"feature view {view.name!r} of service {service!r} has no offline data at "
                f"{view.batch_source.path} (item embeddings come from `avrec embed` and "
                f"`avrec fuse`; or use --feature-service behaviour_features)"
            )


def build_training_set(
    spec: TrainingSetSpec,
    store: FeatureStore | None = None,
    offline: Path | None = None,
    output: Literal["polars", "pandas"] = "polars",
    engine: Engine = DEFAULT_TRAINING_SET_ENGINE,
    spark_master: str | None = None,
) -> pl.DataFrame | pd.DataFrame:
    """Labels of ``spec`` joined point-in-time with the feature service's features.

    ``engine="duckdb"`` (the default, :data:`avrec.names.DEFAULT_TRAINING_SET_ENGINE`, also
    ``avrec training-set``'s) runs Feast's semantics as one DuckDB ASOF join per feature view
    (:mod:`avrec.pit_join`), much faster and leaner at millions of rows; ``engine="feast"``
    goes through Feast's ``get_historical_features`` (the reference); ``engine="spark"`` the
    same join on Spark (:mod:`avrec.spark.pit_join`, master ``spark_master``).
    """
    from avrec.feature_store import get_store

    events, items = tables.read_table("events", offline), tables.read_table("items", offline)
    labels = build_labels(events, items, spec)
    store = store or get_store()
    _check_offline_data(store, spec.feature_service)
    if engine == "duckdb":
        from avrec.pit_join import join_features_duckdb

        frame = join_features_duckdb(labels, store, spec.feature_service)
    elif engine == "spark":
        from avrec.spark.pit_join import join_features_spark

        frame = join_features_spark(labels, store, spec.feature_service, spark_master)
    elif engine == "feast":
        frame = join_features_feast(labels, store, spec.feature_service)
    else:
        raise TrainingSetError(f"engine must be feast, duckdb or spark, not {engine!r}")
    return to_pandas(frame) if output == "pandas" else frame


def to_pandas(frame: pl.DataFrame) -> pd.DataFrame:
    """Arrow-backed pandas: nullable Int64 stays Int64 and lists stay lists (no float NaNs)."""
    import pandas as pd

    return frame.to_arrow().to_pandas(types_mapper=pd.ArrowDtype)


def write_training_set(frame: pl.DataFrame, path: Path) -> Path:
    """Write a training set to Parquet atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    frame.write_parquet(tmp)
    tmp.replace(path)
    return path
