"""The web page against the real serving stack of ``tests/server`` (MovieLens, Feast, Redis, an
``avrec train`` model, the gRPC service serving the hybrid).

The stack is the session's ``stack`` fixture (:mod:`tests.serving_stack`), built once whichever
suite asks first. The web gets its own catalogue copy with the shared posters as image
paths (the stack ingests none) and text / image vectors for the neighbour rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest

from avrec import tables
from tests import serving_stack as server
from tests.conftest import POSTERS

MISSING_POSTER_ITEM = 2  # its image_path points at a file that does not exist


@dataclass
class WebFiles:
    items: Path
    encodings: Path
    embeddings: Path
    offline: Path


@pytest.fixture(scope="session")
def web_files(stack: server.Stack, tmp_path_factory: pytest.TempPathFactory) -> WebFiles:
    """The catalogue with the shared posters as image paths (one pointing nowhere), and
    seeded text / image vectors beside the stack's mixed ones."""
    out = tmp_path_factory.mktemp("web-catalogue")
    offline = stack.data_dir / "offline"
    items = tables.read_table("items", offline)
    paths = [str(POSTERS / f"{i}.jpg") if (POSTERS / f"{i}.jpg").is_file() else None
             for i in items["item_id"].to_list()]
    items = items.with_columns(pl.Series("image_path", paths, dtype=pl.Utf8)).with_columns(
        pl.when(pl.col("item_id") == MISSING_POSTER_ITEM).then(pl.lit(str(out / "gone.jpg")))
        .otherwise(pl.col("image_path")).alias("image_path"))
    items.write_parquet(out / "items.parquet")
    text = server.genre_embeddings(items, seed=1)["embedding"]
    image = server.genre_embeddings(items, seed=2)["embedding"]
    pl.DataFrame({"item_id": items["item_id"], "text_embedding": text,
                  "image_embedding": image}).write_parquet(out / "item_encodings.parquet")
    return WebFiles(out / "items.parquet", out / "item_encodings.parquet",
                    tables.table_path("item_embeddings", offline), offline)


@pytest.fixture(scope="session")
def web_service(stack: server.Stack) -> Iterator[object]:
    """The gRPC service serving the stack's hybrid, for the web tests alone."""
    from avrec.server.app import start

    with server.stack_env(stack):
        running = start(server.serve_config(stack))
    yield running
    running.stop(0)


def web_settings(files: WebFiles, target: str, reports: list[Path] | None = None):
    from avrec.web.app import WebSettings

    # a generous deadline: the shared test box can be slow, and a slow answer is not the
    # "service down" these tests look for
    return WebSettings(target=target, items=files.items, offline=files.offline,
                       encodings=files.encodings, embeddings=files.embeddings,
                       reports=reports or [], timeout=60.0)
