"""Feature services: the named feature sets that models are trained and served on."""

from feast import FeatureService

from feature_views import item_behaviour, item_embedding, user_behaviour, user_history

behaviour_features = FeatureService(
    name="behaviour_features",
    features=[user_behaviour, item_behaviour],
    description="User and item behaviour only (no embeddings needed).",
)

ranker_features = FeatureService(
    name="ranker_features",
    features=[user_behaviour, item_behaviour, item_embedding[["embedding", "embedding_version"]]],
    description="Everything the ranker reads for a (user, item) pair.",
)

user_features = FeatureService(
    name="user_features",
    features=[user_behaviour],
    description="The user side alone: read once per request (serving) or per user (ranking).",
)

item_features = FeatureService(
    name="item_features",
    features=[item_behaviour],
    description="The item side alone: candidates' behaviour features.",
)

hybrid_features = FeatureService(
    name="hybrid_features",
    features=[user_behaviour, user_history, item_behaviour,
              item_embedding[["embedding", "embedding_version"]]],
    description="What the served hybrid ranker reads: the user's history and behaviour, every "
                "item's behaviour and mixed embedding.",
)
