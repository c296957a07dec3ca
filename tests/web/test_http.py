"""The web page over HTTP (Starlette's TestClient) against the real gRPC service: the cards are
what ``Recommend`` serves, a like goes through ``LogEvents`` and changes the user's online
features as the API reports them, errors are 503 / 400 with a message, posters come only from
the catalogue's own paths."""

from __future__ import annotations

import re

import pytest
from starlette.testclient import TestClient

from avrec.server.client import RankingClient
from avrec.web.app import create_app
from tests import serving_stack as server
from tests.conftest import POSTERS, free_port
from tests.web.conftest import MISSING_POSTER_ITEM, web_settings
from tests.web.reports import write_report

READER = 610  # read only
LIKER = 605  # logs events in these tests (no other suite touches this user)


@pytest.fixture(scope="module")
def target(web_service) -> str:
    return f"127.0.0.1:{web_service.port}"


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    root = tmp_path_factory.mktemp("reports")
    write_report(root / "demo")
    return root


@pytest.fixture(scope="module")
def web(web_files, target, reports):
    with TestClient(create_app(web_settings(web_files, target, [reports]))) as client:
        yield client


@pytest.fixture(scope="module")
def api(target):
    with RankingClient(target) as client:
        yield client


def card_ids(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'<li class="card" data-item-id="(\d+)"', html)]


def user_row_time(answer) -> str | None:
    view = next(v for v in answer.user_features if v.feature_view == "user_behaviour")
    return view.event_timestamp.ToJsonString() if view.HasField("event_timestamp") else None


def test_user_page_shows_what_recommend_serves(web, api) -> None:
    page = web.get(f"/user/{READER}")
    assert page.status_code == 200
    served = api.recommend(READER, top_k=10, explain=True)
    assert card_ids(page.text) == [i.item_id for i in served.items]
    for item in served.items:
        assert f'src="/poster/{item.item_id}"' in page.text
    assert served.model_version in page.text and served.embedding_version in page.text
    assert "because you rated" in page.text and "cold start" not in page.text
    assert "render;dur=" in page.headers["server-timing"]
    diverse = web.get(f"/user/{READER}/cards", params={"diversity": "0.3", "k": "12"})
    wanted = api.recommend(READER, top_k=12, explain=True, diversity_lambda=0.3)
    assert card_ids(diverse.text) == [i.item_id for i in wanted.items]
    assert card_ids(diverse.text) != card_ids(page.text)[:12]


def test_a_like_is_logged_and_changes_features_and_list(web, api) -> None:
    before = api.recommend(LIKER, top_k=10)
    shown = card_ids(web.get(f"/user/{LIKER}").text)
    liked = web.post(f"/api/users/{LIKER}/ratings", json={"item_id": shown[0], "rating": 5})
    assert liked.status_code == 200 and liked.json()["accepted"] == 1
    after = api.recommend(LIKER, top_k=10)
    # the user's behaviour row is now stamped at the service's clock (the like's time)
    assert user_row_time(after) != user_row_time(before)
    assert user_row_time(after) >= after.served_at.ToJsonString()[:10]
    fragment = web.get(f"/user/{LIKER}/cards",
                       params={"prev": ",".join(map(str, shown))}, headers={"X-Fragment": "1"})
    ids = card_ids(fragment.text)
    assert ids == [i.item_id for i in after.items] and shown[0] not in ids
    assert re.search(r'class="move move-(new|up|down)"', fragment.text)
    assert "dropped out" in fragment.text


def test_a_new_visitor_is_personalised_after_three_ratings(web, api) -> None:
    start = web.get("/user/new", follow_redirects=False)
    assert start.status_code == 303
    page = web.get(start.headers["location"])
    visitor = int(re.search(r"/user/(\d+)", start.headers["location"]).group(1))
    assert "badge cold" in page.text and "You are new here" in page.text
    search = web.get(f"/user/{visitor}/search", params={"q": "toy story"})
    assert "Toy Story" in search.text and "score for you" in search.text
    found = [int(i) for i in re.findall(r'class="found-item" data-item-id="(\d+)"', search.text)]
    for item_id in found[:3]:
        reply = web.post(f"/api/users/{visitor}/ratings", json={"item_id": item_id, "rating": 5})
        assert reply.status_code == 200, reply.text
    personal = api.recommend(visitor, top_k=10)
    assert not personal.cold_start_user
    page = web.get(f"/user/{visitor}")
    assert "badge cold" not in page.text
    assert card_ids(page.text) == [i.item_id for i in personal.items]


def test_an_unknown_user_gets_the_new_visitor_view_with_a_note(web) -> None:
    page = web.get("/user/987654")
    assert page.status_code == 200
    assert "no fresh history" in page.text and "badge cold" in page.text


@pytest.mark.parametrize(("method", "path", "body", "message"), [
    ("get", "/user/abc", None, "user id must be a whole number"),
    ("get", "/user/0", None, "user id must be a positive number"),
    ("get", "/?user_id=-3", None, "positive"),
    ("get", f"/user/{READER}?k=500", None, "k must be between 1 and 50"),
    ("get", f"/user/{READER}?diversity=nan", None, "diversity must be between"),
    ("get", f"/user/{READER}/cards?prev=1,x", None, "prev must be a whole number"),
    ("get", "/item/zz", None, "item id must be a whole number"),
    ("get", "/evaluation?run=nope", None, "no evaluation run named"),
    ("post", f"/api/users/{LIKER}/ratings", {"item_id": 1, "rating": 7}, "rating must be"),
    ("post", f"/api/users/{LIKER}/ratings", {"item_id": 1, "rating": 2.3}, "multiple of 0.5"),
    ("post", f"/api/users/{LIKER}/ratings", {"item_id": 99999999}, "not in the catalogue"),
    ("post", f"/api/users/{LIKER}/ratings", ["x"], "send a JSON object"),
])
def test_bad_input_is_a_400_with_a_message(web, method, path, body, message) -> None:
    reply = web.post(path, json=body) if method == "post" else web.get(path)
    assert reply.status_code == 400
    assert message in reply.text and "Traceback" not in reply.text


def test_a_stopped_service_is_a_503_banner(stack, web_files) -> None:
    from avrec.server.app import start

    with server.stack_env(stack):
        running = start(server.serve_config(stack))
    with TestClient(create_app(web_settings(web_files, f"127.0.0.1:{running.port}"))) as web:
        assert web.get(f"/user/{READER}").status_code == 200
        running.stop(0)
        for path in (f"/user/{READER}", f"/user/{READER}/cards", "/healthz"):
            reply = web.get(path)
            assert reply.status_code == 503, path
            if path != "/healthz":
                assert 'class="banner banner-down"' in reply.text
                assert "ranking service is not answering" in reply.text
        liked = web.post(f"/api/users/{LIKER}/ratings", json={"item_id": 1})
        assert liked.status_code == 503 and "not answering" in liked.json()["error"]
    with TestClient(create_app(web_settings(web_files, f"127.0.0.1:{free_port()}"))) as web:
        assert web.get(f"/user/{READER}").status_code == 503


def test_posters_come_from_the_catalogue_or_a_placeholder(web) -> None:
    real = web.get("/poster/1")
    assert real.headers["content-type"] == "image/jpeg"
    assert real.content == (POSTERS / "1.jpg").read_bytes()
    missing = web.get(f"/poster/{MISSING_POSTER_ITEM}")
    assert missing.status_code == 200 and missing.headers["content-type"] == "image/svg+xml"
    assert "<svg" in missing.text and "Jumanji" in missing.text
    assert web.get("/poster/1?placeholder=1").headers["content-type"] == "image/svg+xml"
    assert web.get("/poster/99999999").status_code == 404


@pytest.mark.parametrize("path", [
    "/poster/..%2F..%2F..%2Fetc%2Fpasswd", "/poster/1%2F..%2F..%2Fetc%2Fpasswd",
    "/poster/../../etc/passwd", "/static/../../../../etc/passwd",
    "/static/..%2F..%2F..%2F..%2Fetc%2Fpasswd", "/evaluation/demo/report.json",
    "/evaluation/demo/..%2F..%2F..%2Fetc%2Fpasswd", "/evaluation/..%2Fdemo/training.png",
])
def test_no_request_path_reaches_the_file_system(web, path) -> None:
    reply = web.get(path)
    assert reply.status_code in (400, 404), path
    assert "root:" not in reply.text and '"splits"' not in reply.text


def test_item_page_shows_three_neighbour_rows_with_scores(web) -> None:
    page = web.get(f"/item/{MISSING_POSTER_ITEM}?user={READER}")
    assert page.status_code == 200
    for kind in ("text", "image", "mixed"):
        row = re.search(rf'data-kind="{kind}">(.*?)</section>', page.text, re.S).group(1)
        assert len(re.findall(r"<li data-item-id", row)) == 6, kind
    assert "score for user 610" in page.text and "popularity_all" in page.text
    assert web.get("/item/99999999").status_code == 404


def test_evaluation_page_renders_the_report(web) -> None:
    page = web.get("/evaluation")
    assert page.status_code == 200
    assert "hybrid-mixed" in page.text and "0.1488 ± 0.0149" in page.text
    assert page.text.count("<svg") >= 4 and 'class="whisker"' in page.text
    assert "item-vector ablation" in page.text
    figure = web.get("/evaluation/demo/training.png")
    assert figure.status_code == 200 and figure.content.startswith(b"\x89PNG")


def test_evaluation_page_without_a_report_says_how_to_make_one(web_files, target,
                                                               tmp_path) -> None:
    with TestClient(create_app(web_settings(web_files, target, [tmp_path]))) as web:
        page = web.get("/evaluation")
    assert page.status_code == 200 and "avrec evaluate --out" in page.text
