"""Item facts the ranking service does not return: year, genres, poster path (the offline
``items`` table, the one the service's snapshot titles come from), title search, and an item's
``item_behaviour`` row from the offline table."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import polars as pl

from avrec import tables
from avrec.encoders.item_text import display_title
from avrec.names import ITEM_BEHAVIOUR


@dataclass(frozen=True)
class ItemFacts:
    item_id: int
    title: str
    year: int | None
    genres: tuple[str, ...]
    image_path: str | None

    @property
    def label(self) -> str:
        return f"{self.title} ({self.year})" if self.year else self.title


class Catalogue:
    """Every item of the catalogue by id, loaded once."""

    def __init__(self, items: pl.DataFrame, behaviour_path: Path | None = None) -> None:
        self.items: dict[int, ItemFacts] = {}
        for row in items.iter_rows(named=True):
            genres = tuple(g for g in (row.get("genres") or []) if g != "(no genres listed)")
            self.items[int(row["item_id"])] = ItemFacts(
                int(row["item_id"]), display_title(row["title"] or f"item {row['item_id']}"),
                row.get("year"), genres, row.get("image_path"))
        self._lower = {item_id: facts.title.lower() for item_id, facts in self.items.items()}
        self.behaviour_path = behaviour_path

    @classmethod
    def from_offline(cls, items: Path | None = None, offline: Path | None = None) -> Catalogue:
        frame = pl.read_parquet(items) if items else tables.read_table("items", offline)
        return cls(frame, tables.table_path(ITEM_BEHAVIOUR, offline))

    def __len__(self) -> int:
        return len(self.items)

    def get(self, item_id: int) -> ItemFacts | None:
        return self.items.get(item_id)

    def search(self, query: str, limit: int = 8) -> list[ItemFacts]:
        """Items whose title contains ``query`` (case-insensitive), prefix matches first."""
        needle = " ".join(query.lower().split())
        if not needle:
            return []
        hits = [(not title.startswith(needle), len(title), item_id)
                for item_id, title in self._lower.items() if needle in title]
        return [self.items[item_id] for *_, item_id in sorted(hits)[:limit]]

    def behaviour(self, item_id: int, as_of: datetime | None = None) -> dict | None:
        """The item's newest ``item_behaviour`` row at or before ``as_of`` (offline table)."""
        if self.behaviour_path is None or not self.behaviour_path.exists():
            return None
        rows = pl.scan_parquet(self.behaviour_path).filter(pl.col("item_id") == item_id)
        if as_of is not None:
            rows = rows.filter(pl.col("event_timestamp") <= as_of)
        found = rows.sort("event_timestamp").tail(1).collect()
        return found.row(0, named=True) if found.height else None
