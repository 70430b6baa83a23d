"""Contract of the dedup stage: a perceptual hash and a near-duplicate group per ingested post.

Every post of the ingest output has one row in `dedup.parquet` (kept or not); the posts a group does not keep
are also rows of `rejects.parquet` (reason `near_duplicate`, the detail naming the kept post and the distance).
A post whose image could not be hashed has a null `phash`, is kept (nothing shows it is a duplicate) and is
counted in the manifest's stats by reason; the tag and cache stages reject the image with their own reason
codes when they cannot read it either. Downstream stages read `kept`.
"""
from __future__ import annotations

import pyarrow as pa

from data_contracts.manifest import StageManifest
from data_contracts.tables import REJECTS_SCHEMA

CONTRACT_VERSION = 1
STAGE = "dedup"

DEDUP_SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("phash", pa.uint64()),  # 64-bit DCT perceptual hash (imagehash.phash's definition); null: not hashed
        pa.field("group_id", pa.int64(), nullable=False),  # the representative's post id (itself when alone)
        pa.field("group_size", pa.int32(), nullable=False),
        pa.field("kept", pa.bool_(), nullable=False),  # the one post of its group that downstream stages use
        pa.field("distance", pa.int32()),  # Hamming distance to the representative (0 for it); null: not hashed
    ]
)
SCHEMAS = {"dedup": DEDUP_SCHEMA, "rejects": REJECTS_SCHEMA}


class DedupManifest(StageManifest):
    STAGE = STAGE
    CONTRACT_VERSION = CONTRACT_VERSION
    max_distance: int = 0
    groups: int = 0  # groups of two or more posts
    duplicates: int = 0  # posts not kept because another of their group was
