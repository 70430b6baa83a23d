"""Contract of the bucket stage: aspect-ratio bucket, resize size and crop box per sample."""
from __future__ import annotations

import pyarrow as pa

from data_contracts.manifest import StageManifest
from data_contracts.tables import REJECTS_SCHEMA

CONTRACT_VERSION = 1
STAGE = "bucket"

_i32 = pa.int32()
BUCKETS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("width", _i32),  # original image size
        pa.field("height", _i32),
        pa.field("bucket_w", _i32),
        pa.field("bucket_h", _i32),
        pa.field("resize_w", _i32),  # resize-to-cover size, then crop to the bucket
        pa.field("resize_h", _i32),
        pa.field("crop_left", _i32),
        pa.field("crop_top", _i32),
        pa.field("crop_right", _i32),
        pa.field("crop_bottom", _i32),
        pa.field("flip", pa.bool_()),
    ]
)
SCHEMAS = {"buckets": BUCKETS_SCHEMA, "rejects": REJECTS_SCHEMA}


class BucketManifest(StageManifest):
    STAGE = STAGE
    CONTRACT_VERSION = CONTRACT_VERSION
    buckets: list[tuple[int, int]] = []  # every generated (w, h)
    bucket_counts: dict[str, int] = {}  # "<w>x<h>" -> samples after merging small buckets
