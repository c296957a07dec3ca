"""The web page in a real browser: Debian's chromium, headless, driven by Playwright's Python
package (``executable_path``; Playwright's own browser download is not used), against the real
gRPC service. Screenshots of each page are written under the test's temporary directory."""

from __future__ import annotations

import re
import shutil
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from avrec.encoders.item_text import display_title
from avrec.server.client import RankingClient
from avrec.web.app import create_app
from tests.conftest import free_port
from tests.web.conftest import MISSING_POSTER_ITEM, web_settings
from tests.web.reports import write_report

CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")
READER = 610  # read only
LIKER = 604  # logs a like here (no other suite touches this user)

pytestmark = pytest.mark.skipif(
    not CHROMIUM.is_file(),
    reason=f"no chromium binary at {CHROMIUM} (apt-get install chromium): browser tests skipped")


class Running:
    """An ASGI app on uvicorn in a thread, on a free port."""

    def __init__(self, app) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("uvicorn did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def target(web_service) -> str:
    return f"127.0.0.1:{web_service.port}"


@pytest.fixture(scope="module")
def site(web_files, target, tmp_path_factory) -> Iterator[Running]:
    reports = tmp_path_factory.mktemp("browser-reports")
    write_report(reports / "demo")
    running = Running(create_app(web_settings(web_files, target, [reports])))
    urllib.request.urlopen(f"{running.url}/user/{READER}", timeout=30).close()  # warm
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture()
def page(browser) -> Iterator[object]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    yield opened
    context.close()


@pytest.fixture(scope="module")
def api(target) -> Iterator[RankingClient]:
    with RankingClient(target) as client:
        yield client


# The first contentful paint of the page, in ms (the entry may be recorded after load).
FIRST_PAINT = """() => new Promise((resolve) => {
  const observer = new PerformanceObserver((list) => {
    const entry = list.getEntriesByName("first-contentful-paint")[0];
    if (entry) resolve(entry.startTime);
  });
  observer.observe({ type: "paint", buffered: true });
  setTimeout(() => resolve(null), 5000);
})"""


def card_ids(page) -> list[int]:
    return [int(i) for i in page.locator("li.card").evaluate_all(
        "cards => cards.map(c => c.dataset.itemId)")]


def assert_images_loaded(page, selector: str) -> int:
    page.wait_for_function(
        f"Array.from(document.querySelectorAll({selector!r})).every(i => i.complete)")
    widths = page.locator(selector).evaluate_all("imgs => imgs.map(i => i.naturalWidth)")
    assert widths and all(w > 0 for w in widths), widths
    return len(widths)


REFRESHES = "document.getElementById('user').dataset.refreshed || '0'"


def refreshes(page) -> str:
    """How many times the page has swapped its list in (app.js counts them)."""
    return page.evaluate(REFRESHES)


def wait_for_refresh(page, before: str) -> None:
    page.wait_for_function(f"({REFRESHES}) !== {before!r}", timeout=15000)


def test_user_page_shows_the_served_cards_with_loaded_images(site, page, api, shots) -> None:
    page.goto(f"{site.url}/")  # the browser's own first-page costs (fonts, processes)
    page.goto(f"{site.url}/user/{READER}")
    paint = page.evaluate(FIRST_PAINT)
    served = api.recommend(READER, top_k=10, explain=True)
    assert card_ids(page) == [i.item_id for i in served.items]
    titles = page.locator("li.card h3.title a").all_inner_texts()
    assert titles == [display_title(i.title) for i in served.items]
    assert assert_images_loaded(page, "li.card img.poster") >= 10
    page.screenshot(path=shots / "user.png", full_page=True)
    assert paint is not None
    print(f"first contentful paint {paint:.0f} ms; screenshots in {shots}")
    # the target is <= 1 s (measured in the README); under a load of ~10 on the 2-core box the
    # paint has taken up to 6 s, so only a sanity bound is asserted here
    assert paint < 10_000


def test_a_like_click_changes_the_list_and_the_features(site, page, api, shots) -> None:
    page.goto(f"{site.url}/user/{LIKER}")
    before = card_ids(page)
    row = lambda answer: next(v.event_timestamp.ToJsonString() for v in answer.user_features  # noqa: E731
                              if v.feature_view == "user_behaviour")
    features_before = row(api.recommend(LIKER, top_k=1))
    count = refreshes(page)
    page.locator("li.card").first.locator("button.like").click()
    wait_for_refresh(page, count)
    after = card_ids(page)
    assert after != before and before[0] not in after
    assert page.locator("li.card .move").count() > 0
    assert re.search(r"Logged 5★ for", page.locator("#status").inner_text())
    assert row(api.recommend(LIKER, top_k=1)) != features_before
    assert_images_loaded(page, "li.card img.poster")
    page.screenshot(path=shots / "user-after-like.png", full_page=True)


def test_the_diversity_control_reorders_live(site, page, shots) -> None:
    page.goto(f"{site.url}/user/{READER}")
    plain = card_ids(page)
    count = refreshes(page)
    page.locator("#diversity").fill("0.3")
    wait_for_refresh(page, count)
    diverse = card_ids(page)
    assert diverse != plain and len(diverse) == len(plain)
    page.screenshot(path=shots / "user-diverse.png", full_page=True)


def test_search_rate_from_the_search_box(site, page) -> None:
    visitor = 2_099_999_001
    page.goto(f"{site.url}/user/{visitor}")
    assert page.locator(".badge.cold").count() == 1
    page.locator("#q").fill("Heat")
    page.locator("#search button[type=submit]").click()
    page.wait_for_selector("#search-results .found-item")
    count = refreshes(page)
    page.locator("#search-results .found-item").first.locator("button.star").nth(4).click()
    wait_for_refresh(page, count)
    assert page.locator("#status").inner_text().startswith("Logged 5")
    # one rating is a history: the list is personalised, the cold-start badge and note go
    assert page.locator(".badge.cold").count() == 0 and page.locator(".note").count() == 0


def test_item_page_shows_three_neighbour_rows(site, page, shots) -> None:
    page.goto(f"{site.url}/item/{MISSING_POSTER_ITEM}?user={READER}")
    rows = page.locator("section.neighbour-row")
    assert rows.count() == 3
    for i in range(3):
        assert rows.nth(i).locator("li").count() == 6
    assert_images_loaded(page, "img.poster")  # the item's own picture is a placeholder
    page.screenshot(path=shots / "item.png", full_page=True)


def test_evaluation_page_renders_its_charts(site, page, shots) -> None:
    page.goto(f"{site.url}/evaluation")
    assert page.locator("svg.chart").count() >= 4
    assert page.locator("table.metrics tbody tr").count() == 4
    assert_images_loaded(page, "img.figure")
    page.screenshot(path=shots / "evaluation.png", full_page=True)


def test_a_service_that_is_down_shows_the_banner(web_files, page, shots) -> None:
    dead = Running(create_app(web_settings(web_files, f"127.0.0.1:{free_port()}")))
    try:
        response = page.goto(f"{dead.url}/user/{READER}")
        assert response.status == 503
        assert "not answering" in page.locator(".banner-down").inner_text()
        page.screenshot(path=shots / "service-down.png")
    finally:
        dead.stop()
