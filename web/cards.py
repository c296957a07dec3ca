"""A service answer as cards for the page: the item's facts from the catalogue, the served
score and explanation, and what moved since the list the person saw before (new, up, down)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC

from avrec.server.protocol import ranking_pb2
from avrec.web.catalogue import Catalogue, ItemFacts


@dataclass(frozen=True)
class Because:
    item_id: int
    title: str
    similarity: float


@dataclass(frozen=True)
class Card:
    rank: int
    item_id: int
    title: str
    year: int | None
    genres: tuple[str, ...]
    score: float
    missing_features: bool
    because: Because | None
    movement: str  # "", "new", "up", "down"
    moved_by: int


@dataclass(frozen=True)
class Freshness:
    view: str
    row_time: str | None
    expired: bool
    after_clock: bool


@dataclass(frozen=True)
class Answer:
    cards: list[Card]
    model_version: str
    embedding_version: str
    cold_start: bool
    served_at: str
    freshness: list[Freshness]
    dropped: int  # items of the previous list no longer shown


def _stamp(message) -> str:
    return message.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def movement(item_id: int, rank: int, previous: Sequence[int]) -> tuple[str, int]:
    """("new" | "up" | "down" | "", ranks moved) against the previous list's order."""
    if not previous:
        return "", 0
    if item_id not in previous:
        return "new", 0
    before = list(previous).index(item_id) + 1
    if before > rank:
        return "up", before - rank
    if before < rank:
        return "down", rank - before
    return "", 0


def answer_cards(answer: ranking_pb2.RankResponse, catalogue: Catalogue,
                 previous: Sequence[int] = ()) -> Answer:
    cards = []
    for rank, item in enumerate(answer.items, 1):
        facts = catalogue.get(item.item_id) or ItemFacts(item.item_id, item.title, None, (), None)
        because = None
        if item.HasField("explanation") and item.explanation.history_item_id:
            why = item.explanation
            known = catalogue.get(why.history_item_id)
            because = Because(why.history_item_id, known.title if known else why.history_title,
                              why.similarity)
        moved, by = movement(item.item_id, rank, previous)
        cards.append(Card(rank, item.item_id, facts.title or item.title, facts.year,
                          facts.genres, item.score, item.missing_features, because, moved, by))
    shown = {card.item_id for card in cards}
    freshness = [
        Freshness(view.feature_view,
                  _stamp(view.event_timestamp) if view.HasField("event_timestamp") else None,
                  view.expired, view.after_clock)
        for view in answer.user_features]
    return Answer(cards, answer.model_version, answer.embedding_version, answer.cold_start_user,
                  _stamp(answer.served_at), freshness,
                  sum(1 for item_id in previous if item_id not in shown))
