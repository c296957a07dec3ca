"""Ingest: every input row lands or is rejected with a reason; re-runs are idempotent."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from avrec import ingest, tables
from avrec.ingest_validation import IngestError, IngestReport

from .conftest import MOVIELENS, POSTERS


def _csv_rows(path: Path) -> int:
    with path.open(encoding="utf-8") as f:
        return sum(1 for line in f if line.strip()) - 1


def test_movielens_every_row_accounted_for(movielens_offline: Path) -> None:
    events = tables.read_table("events", movielens_offline)
    items = tables.read_table("items", movielens_offline)
    rejects = tables.read_table("rejects", movielens_offline)

    for source, event_type in (("ratings.csv", "rating"), ("tags.csv", "tag")):
        landed = events.filter(pl.col("event_type") == event_type).height
        rejected = rejects.filter(pl.col("source") == source).height
        assert landed + rejected == _csv_rows(MOVIELENS / source), source
    assert items.height + rejects.filter(pl.col("source") == "movies.csv").height == _csv_rows(
        MOVIELENS / "movies.csv"
    )
    posters = len(list(POSTERS.glob("*.jpg")))
    with_image = items.filter(pl.col("image_path").is_not_null()).height
    assert with_image + rejects.filter(pl.col("source") == "posters").height == posters
    assert with_image == 2947  # shared/datasets/README.md
    assert events.schema == tables.EVENTS_SCHEMA
    assert items.schema == tables.ITEMS_SCHEMA


def test_movielens_values(movielens_offline: Path) -> None:
    items = tables.read_table("items", movielens_offline)
    toy = items.filter(pl.col("item_id") == 1).row(0, named=True)
    assert (toy["title"], toy["year"]) == ("Toy Story", 1995)
    assert toy["genres"] == ["Adventure", "Animation", "Children", "Comedy", "Fantasy"]
    assert "pixar" in toy["tags"]
    assert toy["image_path"].endswith("/1.jpg")
    events = tables.read_table("events", movielens_offline)
    ratings = events.filter(pl.col("event_type") == "rating")
    assert ratings["value"].min() >= 0.5 and ratings["value"].max() <= 5.0
    assert (
        events.select(
            pl.struct("user_id", "item_id", "event_type", "event_timestamp").is_duplicated().any()
        ).item()
        is False
    )


BAD_EVENTS = """user_id,item_id,event_type,value,timestamp
1,10,rating,4.5,964982703
1,10,rating,4.5,964982703
x,10,rating,4.0,964982703
2,10,rating,4.0,yesterday
2,10,rating,7.0,964982703
2,10,rating,NaN,964982703
2,999,rating,4.0,964982703
3,10,play,,2020-01-02T03:04:05Z
3,10,play,1.0
-4,10,play,1,964982703
3,11,like,1,2020-01-02 03:04:05
"""

BAD_ITEMS = """item_id,title,genres,tags,description,image_path
10,Blue Train (1961),Jazz|Hard bop,saxophone,An album,cover10.jpg
11,Kind of Blue,Jazz,,,missing.jpg
11,Kind of Blue again,Jazz,,,
zz,Broken,Jazz,,,
12,,Jazz,,,
"""


@pytest.fixture()
def generic_input(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "events.csv").write_text(BAD_EVENTS)
    (tmp_path / "items.csv").write_text(BAD_ITEMS)
    (tmp_path / "cover10.jpg").write_bytes(b"\xff\xd8\xff")
    return tmp_path / "events.csv", tmp_path / "items.csv"


def test_generic_rejects_with_reasons(generic_input: tuple[Path, Path], tmp_path: Path) -> None:
    events_csv, items_csv = generic_input
    out = tmp_path / "out"
    report = ingest.ingest_generic(events_csv, items_csv, out)
    rejects = tables.read_table("rejects", out)
    by_line = {(r["source"], r["line"]): r["reason"] for r in rejects.iter_rows(named=True)}
    assert by_line[("events.csv", 3)] == "duplicate"
    assert by_line[("events.csv", 4)] == "bad_id"
    assert by_line[("events.csv", 5)] == "bad_timestamp"
    assert by_line[("events.csv", 6)] == "rating_out_of_range"
    assert by_line[("events.csv", 7)] == "bad_value"  # NaN is not a value
    assert by_line[("events.csv", 8)] == "unknown_item"
    assert by_line[("events.csv", 10)] == "wrong_field_count"
    assert by_line[("events.csv", 11)] == "bad_id"
    assert by_line[("items.csv", 4)] == "duplicate"
    assert by_line[("items.csv", 5)] == "bad_id"
    assert by_line[("items.csv", 6)] == "missing_title"
    assert by_line[("items.csv", 0)].startswith("image_not_found")
    assert json.loads(rejects.filter(pl.col("line") == 6)["raw"][0])["value"] == "7.0"

    events = tables.read_table("events", out)
    assert events.height == 3  # lines 2, 9, 12
    assert sorted(events["event_type"].to_list()) == ["like", "play", "rating"]
    items = tables.read_table("items", out)
    blue = items.filter(pl.col("item_id") == 10).row(0, named=True)
    assert (blue["title"], blue["year"], blue["genres"]) == (
        "Blue Train",
        1961,
        ["Jazz", "Hard bop"],
    )
    assert blue["image_path"].endswith("cover10.jpg")
    assert items.filter(pl.col("item_id") == 11)["image_path"][0] is None
    assert sum(report.rejects.values()) == rejects.height


def test_rerun_is_idempotent(generic_input: tuple[Path, Path], tmp_path: Path) -> None:
    events_csv, items_csv = generic_input
    first, second = tmp_path / "a", tmp_path / "b"
    ingest.ingest_generic(events_csv, items_csv, first)
    ingest.ingest_generic(events_csv, items_csv, first)
    ingest.ingest_generic(events_csv, items_csv, second)
    for name in ("events", "items", "rejects"):
        assert tables.read_table(name, first).equals(tables.read_table(name, second)), name


def test_unreadable_input_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "events.csv").write_text("who,what\n1,2\n")
    (tmp_path / "items.csv").write_text("item_id,title\n1,A\n")
    with pytest.raises(IngestError, match="missing column"):
        ingest.ingest_generic(tmp_path / "events.csv", tmp_path / "items.csv", tmp_path / "o")
    with pytest.raises(IngestError, match="not found"):
        ingest.ingest_generic(tmp_path / "nope.csv", tmp_path / "items.csv", tmp_path / "o")


ITEMS_1_TO_20 = "item_id,title\n" + "".join(f"{i},Item {i}\n" for i in range(1, 21))


def assert_accounted(report: IngestReport, out: Path) -> None:
    """read == landed + rejected for every source, and the tables agree with the report."""
    assert report.unaccounted() == {}, report.summary()
    rejects = tables.read_table("rejects", out)
    assert rejects.height == sum(report.rejects.values())
    events = tables.read_table("events", out)
    assert events.height == report.rows_landed["events.csv"]


def test_hostile_files_reject_rows_not_runs(tmp_path: Path) -> None:
    huge = "x" * 140_000
    lines = [
        b"\xef\xbb\xbfuser_id,item_id,event_type,value,timestamp",  # BOM
        b"1,2,rating,4.0,964982703",
        b"\xc2\xb2,2,rating,4.0,964982703",  # id written with a unicode digit
        b"1,3,r\xe9ting,4.0,964982703",  # Latin-1, not UTF-8
        b"1,4,tag,," + huge.encode() + b",964982703",  # a field over 128 KiB
        b"1,5,rating,4.0",  # too few fields
        b"1,5,rating,4.0,964982703,extra",  # too many
        b",,,,",
        b"",
        b"2,6,rating,3.5,964982703",
    ]
    (tmp_path / "events.csv").write_bytes(b"\r\n".join(lines) + b"\r\n")
    (tmp_path / "items.csv").write_text(ITEMS_1_TO_20)
    out = tmp_path / "out"
    report = ingest.ingest_generic(tmp_path / "events.csv", tmp_path / "items.csv", out)
    assert_accounted(report, out)
    assert report.rows_read["events.csv"] == 8 and report.rows_landed["events.csv"] == 2
    by_line = {r["line"]: r["reason"] for r in tables.read_table("rejects", out).iter_rows(
        named=True) if r["source"] == "events.csv"}
    assert by_line == {3: "bad_id", 4: "bad_encoding", 5: "field_too_large",
                       6: "wrong_field_count", 7: "wrong_field_count", 8: "empty_row"}
    events = tables.read_table("events", out)
    assert "\ufffd" not in "".join(events["event_type"].to_list())


def test_read_counts_malformed_rows(tmp_path: Path) -> None:
    rows = [f"{1 + i % 500},{1 + i % 20},play,,{900_000_000 + i}" for i in range(100_000)]
    for at in (10, 20_000, 40_000, 60_000, 99_000):  # 5 malformed: too many / too few fields
        rows.insert(at, "1,2,play" if at % 20_000 else "1,2,play,,900000000,9")
    (tmp_path / "events.csv").write_text(
        "user_id,item_id,event_type,value,timestamp\n" + "\n".join(rows) + "\n")
    (tmp_path / "items.csv").write_text(ITEMS_1_TO_20)
    out = tmp_path / "out"
    report = ingest.ingest_generic(tmp_path / "events.csv", tmp_path / "items.csv", out)
    assert report.rows_read["events.csv"] == 100_005
    assert report.rejected()["events.csv"] == 5
    assert report.rows_landed["events.csv"] == 100_000
    assert_accounted(report, out)


def test_fuzzed_event_files_are_accounted_for(tmp_path_factory: pytest.TempPathFactory) -> None:
    from hypothesis import HealthCheck, given, settings

    from tests.fuzzing import csv_files

    root = tmp_path_factory.mktemp("fuzz")
    (root / "items.csv").write_text(ITEMS_1_TO_20)
    counter = iter(range(10**9))

    @settings(max_examples=150, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(csv_files())
    def one(data: bytes) -> None:
        run = root / str(next(counter))
        run.mkdir()
        (run / "events.csv").write_bytes(data)
        try:
            report = ingest.ingest_generic(run / "events.csv", root / "items.csv", run / "out")
        except IngestError as exc:  # only a file without a usable header is refused
            assert any(m in str(exc) for m in ("missing column", "empty file", "header")), exc
            return
        assert_accounted(report, run / "out")

    one()


def test_fuzzed_item_files_are_accounted_for(tmp_path_factory: pytest.TempPathFactory) -> None:
    from hypothesis import HealthCheck, given, settings

    from tests.fuzzing import ITEM_HEADER, csv_files, item_rows

    root = tmp_path_factory.mktemp("fuzz_items")
    (root / "events.csv").write_text("user_id,item_id,event_type,value,timestamp\n")
    (root / "cover.jpg").write_bytes(b"\xff\xd8\xff")
    counter = iter(range(10**9))

    @settings(max_examples=100, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(csv_files(ITEM_HEADER, item_rows()))
    def one(data: bytes) -> None:
        run = root / str(next(counter))
        run.mkdir()
        (run / "items.csv").write_bytes(data)
        (run / "cover.jpg").write_bytes(b"\xff\xd8\xff")
        try:
            report = ingest.ingest_generic(root / "events.csv", run / "items.csv", run / "out")
        except IngestError as exc:
            assert any(m in str(exc) for m in ("missing column", "empty file", "header")), exc
            return
        assert report.unaccounted() == {}, report.summary()
        items = tables.read_table("items", run / "out")
        assert items.height == report.rows_landed["items.csv"]
        for path in items["image_path"].drop_nulls().to_list():
            assert path == str((run / "cover.jpg").resolve()) or Path(path).is_absolute()

    one()
