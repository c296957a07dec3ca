"""What the web page adds on top of the ranking service: server-side time of the user page.

    python bench/web_bench.py [--target 127.0.0.1:50051] [--requests 300] [--top-k 10]

Needs a running ranking service (``make demo`` leaves one on 127.0.0.1:50051) and the offline
catalogue it serves. The web app runs in process (Starlette's TestClient: no HTTP socket, no
browser); each page reports its own ``Server-Timing`` (the ``Recommend`` call and the rest), so
``render`` is the server-side time of the page minus its ``Recommend`` call: catalogue lookups,
cards, templates. Users are MovieLens ids 1..610 (seeded draw); ``Recommend direct`` is the
same call from a plain client, for reference. Prints p50 / p99 in milliseconds.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np
from starlette.testclient import TestClient

from avrec.server.client import RankingClient
from avrec.web.app import WebSettings, create_app


def timing(header: str, name: str) -> float:
    found = re.search(rf"{name};dur=([0-9.]+)", header)
    return float(found.group(1)) if found else float("nan")


def row(label: str, values: list[float]) -> str:
    a = np.asarray(values)
    return f"| {label} | {np.percentile(a, 50):.2f} | {np.percentile(a, 99):.2f} | {len(a)} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--items", type=Path, help="items table (default: the offline one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    users = np.random.default_rng(args.seed).integers(1, 611, size=args.requests).tolist()
    settings = WebSettings(target=args.target, top_k=args.top_k, items=args.items)
    direct, total, recommend, render, fragment = [], [], [], [], []
    with TestClient(create_app(settings)) as web, RankingClient(args.target) as client:
        web.get("/user/1").raise_for_status()  # loads the catalogue, warms the channel
        for user in users:
            started = time.perf_counter()
            client.recommend(user, top_k=args.top_k, explain=True)
            direct.append((time.perf_counter() - started) * 1000)
            page = web.get(f"/user/{user}")
            page.raise_for_status()
            header = page.headers["server-timing"]
            total.append(timing(header, "total"))
            recommend.append(timing(header, "recommend"))
            render.append(timing(header, "render"))
            cards = web.get(f"/user/{user}/cards", headers={"X-Fragment": "1"})
            fragment.append(timing(cards.headers["server-timing"], "render"))
    print(f"web page over {args.target}, top {args.top_k}, {args.requests} requests")
    print("| what | p50 ms | p99 ms | n |")
    print("|---|---|---|---|")
    print(row("Recommend direct (plain gRPC client)", direct))
    print(row("user page, server side (total)", total))
    print(row("- its Recommend call", recommend))
    print(row("- render on top of Recommend (page)", render))
    print(row("- render on top of Recommend (cards fragment)", fragment))


if __name__ == "__main__":
    main()
