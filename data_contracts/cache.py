"""Contract of the cache stage: VAE latents and per-tag CLIP token ids in Parquet chunks by bucket.

Chunks live at `bucket=<w>x<h>/part-<n>.parquet` (hive-style, so DuckDB/Polars/pyarrow.dataset read them).
Latents are fp16 bytes of shape [4, h/8, w/8] (C-order); multiply by the manifest's scaling factor
after sampling x0 = mean + std * noise.
"""
from __future__ import annotations

import pyarrow as pa
from pydantic import BaseModel

from data_contracts.manifest import StageManifest
from data_contracts.tables import REJECTS_SCHEMA

CONTRACT_VERSION = 1
STAGE = "cache"

# Structured prompt order: count tags, characters, series, general (shuffled at train time), artists,
# quality/rating/meta.
SEGMENTS = ("count", "character", "series", "general", "artist", "quality")

_fields = [
    pa.field("id", pa.int64(), nullable=False),
    pa.field("bucket_w", pa.int32()),
    pa.field("bucket_h", pa.int32()),
    pa.field("flip", pa.bool_()),
    pa.field("latent_mean", pa.binary()),  # fp16 [4, h/8, w/8]
    pa.field("latent_std", pa.binary()),  # fp16 [4, h/8, w/8]; null when the config stores the mean only
    pa.field("quality_label", pa.string()),
    pa.field("tag_weight", pa.float32()),
]
for _seg in SEGMENTS:
    _fields.append(pa.field(f"tags_{_seg}", pa.list_(pa.string())))  # rendered caption text per tag
    _fields.append(pa.field(f"tokens_{_seg}", pa.list_(pa.list_(pa.int32()))))  # CLIP ids per tag, no BOS/EOS
CHUNK_SCHEMA = pa.schema(_fields)
SCHEMAS = {"chunk": CHUNK_SCHEMA, "rejects": REJECTS_SCHEMA}


class ChunkInfo(BaseModel):
    path: str
    bucket: str  # "<w>x<h>"
    rows: int


class CacheManifest(StageManifest):
    STAGE = STAGE
    CONTRACT_VERSION = CONTRACT_VERSION
    vae_identity: str  # sha256 of the weight file the VAE came from
    tokenizer_identity: str
    scaling_factor: float
    latent_dtype: str = "float16"
    stores_std: bool = True
    chunks: list[ChunkInfo] = []
