"""One home for the names and constants every layer shares: the offline feature tables, the
Feast feature views and services (``feature_repo/`` defines them under these names), the
"age in days" unit and the ONNX opset.

Ages in days are the microseconds between two times divided by :data:`DAY_US` (the training
sets multiply by its reciprocal, which is what polars does for a division by a scalar).

>>> (USER_BEHAVIOUR, ITEM_EMBEDDING, ITEM_EMBEDDINGS_TABLE)
('user_behaviour', 'item_embedding', 'item_embeddings')
"""

from __future__ import annotations

# feature views; the behaviour views read the offline tables of the same names
USER_BEHAVIOUR = "user_behaviour"
ITEM_BEHAVIOUR = "item_behaviour"
USER_HISTORY = "user_history"
ITEM_EMBEDDING = "item_embedding"  # reads ITEM_EMBEDDINGS_TABLE
ITEM_EMBEDDINGS_TABLE = "item_embeddings"  # the mixed embeddings `avrec fuse` writes

# feature services
BEHAVIOUR_FEATURES = "behaviour_features"  # user and item behaviour (deep ranker training)
RANKER_FEATURES = "ranker_features"  # behaviour and the mixed embedding
USER_FEATURES = "user_features"
ITEM_FEATURES = "item_features"
HYBRID_FEATURES = "hybrid_features"  # what the served hybrid ranker reads

# point-in-time join engines of a training set (avrec.training_set.Engine), and the default
# of both build_training_set and `avrec training-set`: DuckDB's ASOF joins give Feast's
# values (tests/test_pit_join.py) about 20x faster; "feast" is the reference
TRAINING_SET_ENGINES = ("feast", "duckdb", "spark")
DEFAULT_TRAINING_SET_ENGINE = "duckdb"

DAY_US = 86_400_000_000  # microseconds in a day: ages in days
# ONNX opset of every exported model. 20 has ``Gelu`` as one operator: at 18 the exporter
# wrote each GELU as five (Div, Erf, Add, Mul, Mul) that onnxruntime 1.31 did not fuse back;
# the hybrid's pool scorer (a bag of GELU MLPs) ran 1.5x as long (bench/onnx_opset.py).
OPSET = 20
