"""Contract of the ingest stage: verified posts with full metadata, and rejects."""
from __future__ import annotations

import pyarrow as pa

from data_contracts.manifest import StageManifest
from data_contracts.tables import REJECTS_SCHEMA

CONTRACT_VERSION = 1
STAGE = "ingest"

_tags = pa.list_(pa.string())
POSTS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("md5", pa.string(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
        pa.field("score", pa.int32()),
        pa.field("up_score", pa.int32()),
        pa.field("down_score", pa.int32()),
        pa.field("fav_count", pa.int32()),
        pa.field("rating", pa.string()),  # g / s / q / e (current meaning)
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("file_ext", pa.string()),
        pa.field("file_size", pa.int64()),
        pa.field("source", pa.string()),
        pa.field("parent_id", pa.int64()),
        pa.field("tags_general", _tags),
        pa.field("tags_character", _tags),
        pa.field("tags_copyright", _tags),
        pa.field("tags_artist", _tags),
        pa.field("tags_meta", _tags),
        pa.field("image_path", pa.string(), nullable=False),  # relative to the store's pool folder
        pa.field("query", pa.string()),  # the query that found it first
    ]
)
# id, reason, detail + the query that produced the post (empty for dump sources)
REJECTS = REJECTS_SCHEMA.append(pa.field("query", pa.string()))
SCHEMAS = {"posts": POSTS_SCHEMA, "rejects": REJECTS}


class IngestManifest(StageManifest):
    STAGE = STAGE
    CONTRACT_VERSION = CONTRACT_VERSION
    source: str  # danbooru_api | danbooru_dump
    queries: list[str] = []
    reject_reasons: dict[str, int] = {}
