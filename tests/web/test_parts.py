"""The web page's pieces without a service: movement marks, placeholders, poster paths,
title search, charts, reports, the command line."""

from __future__ import annotations

import json
import os

import polars as pl
import pytest

from avrec.web import report
from avrec.web.cards import movement
from avrec.web.catalogue import Catalogue, ItemFacts
from avrec.web.charts import Bar, bar_chart
from avrec.web.posters import placeholder_svg, poster_file
from avrec.web.serve import parse_args
from tests.web.reports import write_report


def test_movement_against_the_previous_list() -> None:
    previous = [10, 20, 30]
    assert movement(20, 1, previous) == ("up", 1)
    assert movement(10, 3, previous) == ("down", 2)
    assert movement(30, 3, previous) == ("", 0)
    assert movement(40, 1, previous) == ("new", 0)
    assert movement(40, 1, []) == ("", 0)


def test_placeholder_is_an_escaped_svg_tile_with_a_size() -> None:
    svg = placeholder_svg('<script>alert("x")</script> & Co', 1999)
    assert svg.startswith("<svg") and 'width="200"' in svg and 'height="300"' in svg
    assert "<script>" not in svg and "&lt;script&gt;" in svg and "&amp; Co" in svg
    assert "1999" in svg


def test_poster_files_are_the_catalogues_images_only(tmp_path) -> None:
    jpg = tmp_path / "1.jpg"
    jpg.write_bytes(b"\xff\xd8\xff")
    text = tmp_path / "secret.txt"
    text.write_text("no")
    facts = lambda path: ItemFacts(1, "t", None, (), path)  # noqa: E731
    assert poster_file(facts(str(jpg))) == (jpg, "image/jpeg")
    assert poster_file(facts(str(text))) is None
    assert poster_file(facts(str(tmp_path / "gone.jpg"))) is None
    assert poster_file(facts(str(tmp_path))) is None
    assert poster_file(facts(None)) is None and poster_file(None) is None


def test_title_search_puts_prefix_matches_first() -> None:
    items = pl.DataFrame({
        "item_id": [1, 2, 3, 4], "title": ["Toy Story", "Story of Toys", "Toy Story 2",
                                           "Heat"],
        "year": [1995, 2000, 1999, 1995], "genres": [["Animation"], [], [], ["Crime"]],
        "image_path": [None] * 4})
    catalogue = Catalogue(items)
    assert [f.item_id for f in catalogue.search("toy")] == [1, 3, 2]
    assert [f.item_id for f in catalogue.search("  STORY  ")] == [2, 1, 3]
    assert catalogue.search("") == [] and catalogue.search("zzz") == []
    assert catalogue.get(4).label == "Heat (1995)" and catalogue.get(9) is None


def test_bar_chart_draws_whiskers_and_skips_missing_values() -> None:
    svg = bar_chart("t", [Bar("a", 0.1, 0.01), Bar("b", float("nan")), Bar("<c>", 0.2)])
    assert svg.count("<rect") == 2 and svg.count('class="whisker"') == 1
    assert "&lt;c&gt;" in svg


def test_reports_newest_first_and_unreadable_ones_refused(tmp_path) -> None:
    old = write_report(tmp_path / "old", figures=False)
    new = write_report(tmp_path / "new")
    os.utime(old / "report.json", (1, 1))
    runs = report.find_runs([tmp_path])
    assert [r.name for r in runs] == ["new", "old"]
    view = report.load(runs[0])
    assert view.figures == ["training.png"] and len(view.splits) == 1
    assert view.splits[0].best == "ease" and len(view.splits[0].charts) == 4
    (new / "report.json").write_text(json.dumps({"splits": 3}))
    with pytest.raises(report.ReportError, match="not a readable evaluation report"):
        report.load(runs[0])
    assert report.find_runs([tmp_path / "nowhere"]) == []


def test_the_command_line_checks_its_options() -> None:
    args = parse_args(["--port", "9000", "--target", "h:1"])
    assert (args.port, args.target, args.top_k) == (9000, "h:1", 10)
    with pytest.raises(SystemExit):
        parse_args(["--top-k", "0"])
