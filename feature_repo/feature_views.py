"""Feature views over the behaviour tables.

TTLs bound how long a row is trusted after its event_timestamp. Rows are written at every
change point (windowed counts fall to zero by explicit rows), so a TTL expresses trust,
not staleness: a user dormant for two years is treated as a cold-start user. Item statistics
never expire (``ITEM_TTL`` 0 = none in Feast): a film last rated fifteen years ago still has
its all-time count and mean rating, and must not look like a new item; embeddings are kept
for ten years.

Item embeddings are stamped with the cutoff of the interaction data their fusion was
trained on, so a point-in-time join never hands them to a label before that cutoff. Each row
carries ``embedding_version``; a table is written whole per version, and readers refuse an
answer whose vectors disagree on it.
"""

from datetime import timedelta

from feast import FeatureView, Field
from feast.types import Array, Bool, Float32, Float64, Int64, String, UnixTimestamp

from avrec.names import ITEM_BEHAVIOUR, ITEM_EMBEDDING, USER_BEHAVIOUR, USER_HISTORY

from data_sources import (
    item_behaviour_source,
    item_embedding_source,
    user_behaviour_source,
    user_history_source,
)
from entities import item, user

USER_TTL = timedelta(days=730)
ITEM_TTL = timedelta(0)  # no expiry (see the module docstring)
EMBEDDING_TTL = timedelta(days=3650)

user_behaviour = FeatureView(
    name=USER_BEHAVIOUR,
    entities=[user],
    ttl=USER_TTL,
    schema=[
        Field(name="interactions_1d", dtype=Int64),
        Field(name="interactions_7d", dtype=Int64),
        Field(name="interactions_30d", dtype=Int64),
        Field(name="interactions_all", dtype=Int64),
        Field(name="mean_rating", dtype=Float64),
        Field(name="positive_share", dtype=Float64),
        Field(name="last_interaction_at", dtype=UnixTimestamp),
        Field(name="genre_affinity", dtype=Array(Float32)),
        Field(name="recent_items", dtype=Array(Int64)),
    ],
    online=True,
    source=user_behaviour_source,
    description="What a user did, as of each change point (windows are (t - w, t]).",
)

user_history = FeatureView(
    name=USER_HISTORY,
    entities=[user],
    ttl=USER_TTL,
    schema=[
        Field(name="history_items", dtype=Array(Int64)),
        Field(name="history_ratings", dtype=Array(Float32)),
    ],
    online=True,
    source=user_history_source,
    description=(
        "A user's newest ratings (items and ratings, oldest first), the hybrid ranker's "
        "history. Latest state only: one row per user, stamped at the newest rating, so a "
        "historical read before it finds nothing (training rebuilds histories from events)."
    ),
)

item_behaviour = FeatureView(
    name=ITEM_BEHAVIOUR,
    entities=[item],
    ttl=ITEM_TTL,
    schema=[
        Field(name="popularity_1d", dtype=Int64),
        Field(name="popularity_7d", dtype=Int64),
        Field(name="popularity_30d", dtype=Int64),
        Field(name="popularity_all", dtype=Int64),
        Field(name="mean_rating", dtype=Float64),
        Field(name="rating_count", dtype=Int64),
        Field(name="first_interaction_at", dtype=UnixTimestamp),
    ],
    online=True,
    source=item_behaviour_source,
    description="How an item was consumed, as of each change point.",
)

item_embedding = FeatureView(
    name=ITEM_EMBEDDING,
    entities=[item],
    ttl=EMBEDDING_TTL,
    schema=[
        Field(name="embedding", dtype=Array(Float32)),
        Field(name="embedding_asum", dtype=Array(Float32)),
        Field(name="has_image", dtype=Bool),
        Field(name="embedding_version", dtype=String),
    ],
    online=True,
    source=item_embedding_source,
    description="Mixed item embedding: learned (gated) fusion, and the weighted-sum baseline.",
)
