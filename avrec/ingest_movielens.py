"""Ingest a MovieLens-latest directory: ``ratings.csv movies.csv tags.csv`` (``links.csv`` is not
needed) plus an optional poster directory of ``<movieId>.jpg`` files.

Its rows are mapped onto the generic format's (:mod:`avrec.ingest`) and land in the same
tables: ratings and tags as events, a tag's text also among its item's tags.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from avrec.ingest import catalogue_items, events_from_rows, finish
from avrec.ingest_validation import IngestReport, Rejects, digits, read_csv


def ingest_movielens(
    ml_dir: Path, out_dir: Path, posters_dir: Path | None = None, now: datetime | None = None
) -> IngestReport:
    """Ingest a MovieLens-latest directory (and optional posters) into ``out_dir``."""
    ml_dir, report, rejects = Path(ml_dir), IngestReport(), Rejects()
    latest = now or datetime.now(UTC)

    movie_rows, report.rows_read["movies.csv"] = read_csv(
        ml_dir / "movies.csv", ["movieId", "title", "genres"], rejects)
    posters = (
        {int(p.stem): p.resolve() for p in Path(posters_dir).glob("*.jpg") if digits(p.stem)}
        if posters_dir
        else {}
    )
    items = catalogue_items(
        "movies.csv",
        [(line, {"item_id": r["movieId"], **r}) for line, r in movie_rows],
        rejects,
        lambda item_id, _row: str(posters[item_id]) if item_id in posters else None,
    )
    known = {item["item_id"] for item in items}
    for item_id in sorted(set(posters) - known):
        rejects.add("posters", 0, "unknown_item", str(posters[item_id]))
    report.rows_read["posters"] = len(posters)
    report.rows_landed["posters"] = sum(1 for i in items if i["image_path"] is not None)

    rating_rows, report.rows_read["ratings.csv"] = read_csv(
        ml_dir / "ratings.csv", ["userId", "movieId", "rating", "timestamp"], rejects
    )
    events = events_from_rows(
        "ratings.csv",
        [
            (
                line,
                {
                    "user_id": r["userId"],
                    "item_id": r["movieId"],
                    "event_type": "rating",
                    "value": r["rating"],
                    "timestamp": r["timestamp"],
                },
            )
            for line, r in rating_rows
        ],
        known,
        rejects,
        latest,
    )

    item_tags: dict[int, Counter[str]] = {}
    tags_path = ml_dir / "tags.csv"
    if tags_path.exists():
        tag_rows, report.rows_read["tags.csv"] = read_csv(
            tags_path, ["userId", "movieId", "tag", "timestamp"], rejects)
        valid = []
        for line, r in tag_rows:
            if not r["tag"].strip():
                rejects.add("tags.csv", line, "empty_tag", r)
            else:
                valid.append((line, r))
        tag_events = events_from_rows(
            "tags.csv",
            [
                (
                    line,
                    {
                        "user_id": r["userId"],
                        "item_id": r["movieId"],
                        "event_type": "tag",
                        "value": "",
                        "timestamp": r["timestamp"],
                        "tag": r["tag"],
                    },
                )
                for line, r in valid
            ],
            known,
            rejects,
            latest,
        )
        for e in tag_events:
            item_tags.setdefault(e["item_id"], Counter())[e["_raw"]["tag"].strip().lower()] += 1
        events += tag_events
    return finish(events, items, item_tags, rejects, Path(out_dir), report, "movies.csv")
