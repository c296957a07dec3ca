"""The text an item is embedded from: title, year, genres, tags (and a description if any).

Example: ``"The Shawshank Redemption (1994). Genres: Crime, Drama. Tags: prison, hope"``.
MovieLens writes leading articles at the end (``"Shawshank Redemption, The"``); they are moved
back to the front so the sentence encoder reads natural titles. The composed string is also what
the embed job hashes to decide whether an item must be re-embedded.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import polars as pl

MAX_TAGS = 8
MAX_DESCRIPTION_CHARS = 600
NO_GENRES = "(no genres listed)"
_TRAILING_ARTICLE = re.compile(
    r"^(?P<title>.+?), (?P<article>The|A|An|Les|Le|La|L'|Il|Der|Die|Das|El|Los|Las|Un|Une)"
    r"(?P<rest> \(.*\))?$"
)


def display_title(title: str) -> str:
    """``"Shawshank Redemption, The"`` -> ``"The Shawshank Redemption"`` (alt titles kept)."""
    title = title.strip()
    match = _TRAILING_ARTICLE.match(title)
    if not match:
        return title
    article = match["article"]
    joiner = "" if article.endswith("'") else " "
    return f"{article}{joiner}{match['title']}{match['rest'] or ''}"


def compose(
    title: str,
    year: int | None = None,
    genres: Sequence[str] | None = None,
    tags: Sequence[str] | None = None,
    description: str | None = None,
) -> str:
    """One item's text: ``"<title> (<year>). Genres: a, b. Tags: x, y. <description>"``."""
    head = display_title(title or "")
    if year is not None:
        head = f"{head} ({year})"
    parts = [head]
    kept_genres = [g for g in (genres if genres is not None else []) if g and g != NO_GENRES]
    if kept_genres:
        parts.append("Genres: " + ", ".join(kept_genres))
    kept_tags = _dedupe(tags if tags is not None else [])[:MAX_TAGS]
    if kept_tags:
        parts.append("Tags: " + ", ".join(kept_tags))
    if description and description.strip():
        parts.append(description.strip()[:MAX_DESCRIPTION_CHARS])
    return ". ".join(parts)


def _dedupe(values: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for value in values:
        key = value.strip().lower()
        if key and key not in seen:
            seen.add(key)
            out.append(value.strip())
    return out


def item_texts(items: pl.DataFrame) -> list[str]:
    """Compose the text of every row of an items frame (``ITEMS_SCHEMA`` columns)."""
    n = items.height

    def column(name: str) -> list:
        return items[name].to_list() if name in items.columns else [None] * n

    rows = zip(
        column("title"),
        column("year"),
        column("genres"),
        column("tags"),
        column("description"),
        strict=True,
    )
    return [compose(*row) for row in rows]


def text_hash(text: str) -> str:
    """Content hash of a composed text (SHA-256 hex)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
