"""Feature services: the named feature sets that models are trained and served on."""

from feast import FeatureService

from feature_views import item_behaviour, user_behaviour

ranker_features = FeatureService(
    name="ranker_features",
    features=[user_behaviour, item_behaviour],
    description="Everything the ranker reads for a (user, item) pair.",
)
