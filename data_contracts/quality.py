"""Contract of the quality stage: one of four quality labels per sample."""
from __future__ import annotations

import pyarrow as pa

from data_contracts.manifest import StageManifest
from data_contracts.tables import REJECTS_SCHEMA

CONTRACT_VERSION = 1
STAGE = "quality"

QUALITY_LABELS = ("worst score", "bad score", "good score", "masterpiece")  # worst -> best
QUALITY_SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("year", pa.int16()),
        pa.field("norm_score", pa.float32()),  # within-year percentile of the popularity signal, 0..1
        pa.field("label", pa.string()),  # one of QUALITY_LABELS
        pa.field("cluster", pa.int8()),  # 0 = worst .. 3 = best
    ]
)
SCHEMAS = {"quality": QUALITY_SCHEMA, "rejects": REJECTS_SCHEMA}


class QualityManifest(StageManifest):
    STAGE = STAGE
    CONTRACT_VERSION = CONTRACT_VERSION
    method: str  # kmeans | percentile
    label_counts: dict[str, int] = {}
