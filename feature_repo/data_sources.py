"""Offline sources: Parquet tables written by `avrec ingest` / `avrec features`.

Paths are absolute, resolved from AVREC_DATA_DIR (default `<repo>/data`), because the
DuckDB offline store resolves relative FileSource paths against the working directory.
"""

from feast import FileSource

from avrec import tables
from avrec.names import ITEM_BEHAVIOUR, ITEM_EMBEDDINGS_TABLE, USER_BEHAVIOUR, USER_HISTORY

user_behaviour_source = FileSource(
    name="user_behaviour_source",
    path=str(tables.table_path(USER_BEHAVIOUR)),
    timestamp_field="event_timestamp",
    created_timestamp_column="created_timestamp",
    description="One row per user per change point of the user's behaviour features.",
)

user_history_source = FileSource(
    name="user_history_source",
    path=str(tables.table_path(USER_HISTORY)),
    timestamp_field="event_timestamp",
    created_timestamp_column="created_timestamp",
    description="One row per user: their newest ratings, stamped at the newest one.",
)

item_behaviour_source = FileSource(
    name="item_behaviour_source",
    path=str(tables.table_path(ITEM_BEHAVIOUR)),
    timestamp_field="event_timestamp",
    created_timestamp_column="created_timestamp",
    description="One row per item per change point of the item's behaviour features.",
)

item_embedding_source = FileSource(
    name="item_embedding_source",
    path=str(tables.table_path(ITEM_EMBEDDINGS_TABLE)),
    timestamp_field="event_timestamp",
    created_timestamp_column="created_timestamp",
    description="Mixed (text + image) item embeddings written by `avrec fuse`, one version.",
)
