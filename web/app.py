"""The web page for people: a Starlette app over the gRPC ranking service.

Pages: ``/user/{id}`` (recommendations as cards, a diversity control, like / rate buttons and a
title search, each click a ``LogEvents`` call), ``/item/{id}`` (neighbours by text, image and
mixed vectors), ``/evaluation`` (the latest ``avrec evaluate`` report), ``/poster/{id}``.
Errors a person can act on: service down -> banner and 503, bad input -> 400 with the reason,
unknown user -> the new-visitor view with a note; never a stack trace.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from avrec import config
from avrec.web import report
from avrec.web.cards import answer_cards
from avrec.web.catalogue import Catalogue
from avrec.web.gateway import Gateway, ServiceError, Timings
from avrec.web.posters import placeholder_svg, poster_file
from avrec.web.similar import Similar, VectorTables

HERE = Path(__file__).parent
MAX_TOP_K = 50
NEW_VISITOR_IDS = (2_000_000_000, 2_100_000_000)  # far above any catalogue's user ids
log = logging.getLogger("avrec.web")


@dataclass(frozen=True)
class WebSettings:
    target: str = "127.0.0.1:50051"
    top_k: int = 10
    timeout: float = 5.0
    items: Path | None = None  # the items table (default: the offline one)
    offline: Path | None = None  # the offline tables (default: $AVREC_DATA_DIR/offline)
    encodings: Path | None = None  # item_encodings (text, image vectors)
    embeddings: Path | None = None  # item_embeddings (mixed vectors)
    reports: list[Path] = field(default_factory=list)  # where report.json runs are looked for
    token: str | None = None  # the service's bearer token, when it wants one
    root_cert: bytes | None = None  # CA certificate of a TLS service

    def report_roots(self) -> list[Path]:
        data = config.data_dir()
        return self.reports or [data / "reports", data / "evaluation"]

    def vector_tables(self) -> VectorTables:
        default = VectorTables.offline(self.offline)
        return VectorTables(self.encodings or default.encodings,
                            self.embeddings or default.embeddings)


class BadInputError(ServiceError):
    def __init__(self, message: str) -> None:
        super().__init__(400, message)


def positive_id(text: str | None, what: str) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        raise BadInputError(f"{what} must be a whole number, got {text!r}") from None
    if not 0 < value < 2**63:
        raise BadInputError(f"{what} must be a positive number, got {value}")
    return value


def bounded(text: str | None, what: str, low: float, high: float, default: float,
            integer: bool = False) -> float:
    if text is None or text == "":
        return default
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        raise BadInputError(f"{what} must be a number, got {text!r}") from None
    if not (math.isfinite(value) and low <= value <= high):
        raise BadInputError(f"{what} must be between {low:g} and {high:g}, got {text}")
    return value


def id_list(text: str | None) -> list[int]:
    if not text:
        return []
    return [positive_id(part, "prev") for part in text.split(",")[:MAX_TOP_K]]


def server_timing(response: Response, timings: Timings, started: float) -> Response:
    total = (time.perf_counter() - started) * 1000
    calls = ", ".join(f"{name};dur={seconds * 1000:.2f}" for name, seconds in timings.calls)
    response.headers["Server-Timing"] = ", ".join(
        p for p in (calls, f"render;dur={total - timings.total * 1000:.2f}",
                    f"total;dur={total:.2f}") if p)
    return response


def create_app(settings: WebSettings | None = None, gateway: Gateway | None = None) -> Starlette:
    settings = settings or WebSettings()
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    state: dict = {}

    def catalogue() -> Catalogue:
        if "catalogue" not in state:
            state["catalogue"] = Catalogue.from_offline(settings.items, settings.offline)
        return state["catalogue"]

    def service() -> Gateway:
        if "gateway" not in state:
            state["gateway"] = gateway or Gateway(settings.target, settings.timeout,
                                                  settings.token, settings.root_cert)
        return state["gateway"]

    def similar() -> Similar:
        if "similar" not in state:
            state["similar"] = Similar(settings.vector_tables())
        return state["similar"]

    def page(request: Request, name: str, code: int = 200, **context) -> Response:
        return templates.TemplateResponse(request, name, {"settings": settings, **context},
                                          status_code=code)

    def index(request: Request) -> Response:
        raw = request.query_params.get("user_id")
        if raw is not None:
            return RedirectResponse(f"/user/{positive_id(raw, 'user id')}", 303)
        return page(request, "index.html")

    def new_visitor(request: Request) -> Response:
        low, high = NEW_VISITOR_IDS
        return RedirectResponse(f"/user/{low + secrets.randbelow(high - low)}?new=1", 303)

    def list_request(request: Request) -> tuple[int, int, float]:
        user_id = positive_id(request.path_params["user_id"], "user id")
        params = request.query_params
        top_k = int(bounded(params.get("k"), "k", 1, MAX_TOP_K, settings.top_k, integer=True))
        diversity = bounded(params.get("diversity"), "diversity", 0.0, 1.0, 0.0)
        return user_id, top_k, diversity

    def user_page(request: Request, fragment: bool) -> Response:
        started = time.perf_counter()
        user_id, top_k, diversity = list_request(request)
        previous = id_list(request.query_params.get("prev"))
        timings = Timings()
        served = service().recommend(user_id, top_k, diversity, timings)
        answer = answer_cards(served, catalogue(), previous)
        context = {"user_id": user_id, "answer": answer, "top_k": top_k, "diversity": diversity,
                   "new_visitor": request.query_params.get("new") == "1"}
        response = page(request, "_answer.html" if fragment else "user.html", **context)
        return server_timing(response, timings, started)

    def user(request: Request) -> Response:
        return user_page(request, fragment=False)

    def user_cards(request: Request) -> Response:
        return user_page(request, fragment=True)

    def search(request: Request) -> Response:
        user_id = positive_id(request.path_params["user_id"], "user id")
        query = request.query_params.get("q", "").strip()
        if len(query) > 200:
            raise BadInputError("the search text is longer than 200 characters")
        found = catalogue().search(query) if query else []
        scores: dict[int, float] = {}
        if found:
            try:
                ranked = service().rank(user_id, [f.item_id for f in found])
                scores = {item.item_id: item.score for item in ranked.items}
            except ServiceError as exc:
                if exc.status != 400:  # items the service cannot score are shown unscored
                    raise
        return page(request, "_search.html", user_id=user_id, query=query, found=found,
                    scores=scores)

    async def rate(request: Request) -> Response:
        user_id = positive_id(request.path_params["user_id"], "user id")
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise BadInputError("send a JSON object {\"item_id\": ..., \"rating\": ...}")
        item_id = positive_id(body.get("item_id"), "item_id")
        rating = bounded(str(body.get("rating", 5.0)), "rating", 0.5, 5.0, 5.0)
        if rating * 2 != int(rating * 2):
            raise BadInputError("rating must be a multiple of 0.5")
        facts = catalogue().get(item_id)
        if facts is None:
            raise BadInputError(f"item {item_id} is not in the catalogue")
        reply = await run_in_threadpool(service().rate, user_id, item_id, rating)
        return JSONResponse({"accepted": reply.accepted, "user_id": user_id,
                             "item_id": item_id, "title": facts.title, "rating": rating,
                             "users_updated": list(reply.users_updated)})

    def item(request: Request) -> Response:
        item_id = positive_id(request.path_params["item_id"], "item id")
        facts = catalogue().get(item_id)
        if facts is None:
            raise HTTPException(404, f"item {item_id} is not in the catalogue")
        viewer = request.query_params.get("user")
        viewer_id = positive_id(viewer, "user") if viewer else None
        rows = similar().neighbours(item_id)
        scores: dict[int, float] = {}
        as_of = None
        ids = list(dict.fromkeys([item_id] + [i for r in rows for i, _ in r.items]))
        if viewer_id is not None and len(ids) > 1:  # scores are relative to the candidates
            try:
                ranked = service().rank(viewer_id, ids)
                scores = {i.item_id: i.score for i in ranked.items}
                as_of = ranked.served_at.ToDatetime(tzinfo=UTC)
            except ServiceError as exc:
                if exc.status != 400:
                    raise
        behaviour = catalogue().behaviour(item_id, as_of)
        return page(request, "item.html", facts=facts, rows=rows, catalogue=catalogue(),
                    viewer=viewer_id, scores=scores, behaviour=behaviour)

    def runs() -> list[report.Run]:
        return report.find_runs(settings.report_roots())

    def evaluation(request: Request) -> Response:
        found = runs()
        wanted = request.query_params.get("run")
        chosen = next((r for r in found if r.name == wanted), None) if wanted else None
        if wanted and chosen is None:
            raise BadInputError(f"no evaluation run named {wanted!r}")
        chosen = chosen or (found[0] if found else None)
        view = report.load(chosen) if chosen else None
        return page(request, "evaluation.html", runs=found, view=view,
                    roots=settings.report_roots())

    def figure(request: Request) -> Response:
        name, run_name = request.path_params["name"], request.path_params["run"]
        run = next((r for r in runs() if r.name == run_name), None)
        if run is None or name not in report.FIGURES:
            raise HTTPException(404, "no such figure")
        path = run.directory / name
        if not path.is_file():
            raise HTTPException(404, "no such figure")
        return FileResponse(path, media_type="image/png")

    def poster(request: Request) -> Response:
        item_id = positive_id(request.path_params["item_id"], "item id")
        facts = catalogue().get(item_id)
        found = None if request.query_params.get("placeholder") else poster_file(facts)
        headers = {"Cache-Control": "public, max-age=3600"}
        if found is not None:
            return FileResponse(found[0], media_type=found[1], headers=headers)
        title = facts.title if facts else f"item {item_id}"
        return Response(placeholder_svg(title, facts.year if facts else None),
                        status_code=200 if facts else 404, media_type="image/svg+xml",
                        headers=headers)

    def health(request: Request) -> Response:
        serving = service().serving()
        return JSONResponse({"service": "serving" if serving else "down",
                             "target": settings.target}, status_code=200 if serving else 503)

    def failure(request: Request, status: int, message: str) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": message}, status_code=status)
        name = "_banner.html" if request.headers.get("x-fragment") else "error.html"
        return page(request, name, status, status=status, message=message)

    async def on_service_error(request: Request, exc: ServiceError) -> Response:
        return failure(request, exc.status, exc.message)

    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        return failure(request, exc.status_code, str(exc.detail))

    async def on_report_error(request: Request, exc: report.ReportError) -> Response:
        return failure(request, 500, str(exc))

    async def on_crash(request: Request, exc: Exception) -> Response:
        log.exception("web request failed: %s", request.url.path)
        return failure(request, 500, "Something went wrong on our side; it has been logged.")

    routes = [
        Route("/", index),
        Route("/user/new", new_visitor),
        Route("/user/{user_id}", user),
        Route("/user/{user_id}/cards", user_cards),
        Route("/user/{user_id}/search", search),
        Route("/api/users/{user_id}/ratings", rate, methods=["POST"]),
        Route("/item/{item_id}", item),
        Route("/evaluation", evaluation),
        Route("/evaluation/{run}/{name}", figure),
        Route("/poster/{item_id}", poster),
        Route("/healthz", health),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    return Starlette(routes=routes, exception_handlers={
        ServiceError: on_service_error, HTTPException: on_http_error,
        report.ReportError: on_report_error, Exception: on_crash})
