"""Feature services: the named feature sets that models are trained and served on."""

from feast import FeatureService

from avrec.names import (
    BEHAVIOUR_FEATURES,
    HYBRID_FEATURES,
    ITEM_FEATURES,
    RANKER_FEATURES,
    USER_FEATURES,
)

from feature_views import item_behaviour, item_embedding, user_behaviour, user_history

behaviour_features = FeatureService(
    name=BEHAVIOUR_FEATURES,
    features=[user_behaviour, item_behaviour],
    description="User and item behaviour only (no embeddings needed).",
)

ranker_features = FeatureService(
    name=RANKER_FEATURES,
    features=[user_behaviour, item_behaviour, item_embedding[["embedding", "embedding_version"]]],
    description="Everything the ranker reads for a (user, item) pair.",
)

user_features = FeatureService(
    name=USER_FEATURES,
    features=[user_behaviour],
    description="The user side alone: read once per request (serving) or per user (ranking).",
)

item_features = FeatureService(
    name=ITEM_FEATURES,
    features=[item_behaviour],
    description="The item side alone: candidates' behaviour features.",
)

hybrid_features = FeatureService(
    name=HYBRID_FEATURES,
    features=[user_behaviour, user_history, item_behaviour,
              item_embedding[["embedding", "embedding_version"]]],
    description="What the served hybrid ranker reads: the user's history and behaviour, every "
                "item's behaviour and mixed embedding.",
)
