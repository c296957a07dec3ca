"""Entities: the keys every avrec feature hangs off."""

from feast import Entity, ValueType

user = Entity(
    name="user",
    join_keys=["user_id"],
    value_type=ValueType.INT64,
    description="A listener or viewer (MovieLens userId, or the catalogue's own user id).",
)

item = Entity(
    name="item",
    join_keys=["item_id"],
    value_type=ValueType.INT64,
    description="A film, video or track (MovieLens movieId, or the catalogue's own item id).",
)
