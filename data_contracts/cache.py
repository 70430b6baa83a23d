"""Contract of the cache stage: VAE latents and per-tag CLIP token ids in Parquet chunks by bucket.

Chunks live at `chunks/bucket=<w>x<h>/part-<n>.parquet` (hive-style: DuckDB, Polars and pyarrow.dataset
read `chunks/` directly). Latents are fp16 bytes of shape [C, h/f, w/f] (C-order; C = latent_channels = 4,
f = latent_downscale = 8 for SD1.5); multiply by the manifest's scaling factor after sampling
x0 = mean + std * noise. Token ids are those of the tag as the prompt parser hands it to CLIP (the
rendered tag with its `\\(` `\\)` escapes removed), without BOS/EOS; `tokens_<seg>` without a separator,
`tokens_sep_<seg>` with the ", " that follows the tag inside a caption.
"""
from __future__ import annotations

import pyarrow as pa
from pydantic import BaseModel

from data_contracts.manifest import StageManifest
from data_contracts.tables import REJECTS_SCHEMA

CONTRACT_VERSION = 2
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
    # CLIP ids of the tag followed by its ", " separator: the comma merges with trailing punctuation
    # (`(series),` ends in one token `),`; `^_^,` tokenizes unlike `^_^`), so a prompt's exact ids are
    # tokens_sep of every tag but the last + tokens of the last.
    _fields.append(pa.field(f"tokens_sep_{_seg}", pa.list_(pa.list_(pa.int32()))))
CHUNK_SCHEMA = pa.schema(_fields)
SCHEMAS = {"chunk": CHUNK_SCHEMA, "rejects": REJECTS_SCHEMA}


class ChunkInfo(BaseModel):
    path: str  # relative to the output folder
    bucket: str  # "<w>x<h>"
    rows: int
    bytes: int = 0
    sha256: str = ""
    row_groups: list[int] = []  # rows per row group, in file order (the reader plans its I/O with it)


class CacheManifest(StageManifest):
    STAGE = STAGE
    CONTRACT_VERSION = CONTRACT_VERSION
    vae_identity: str  # sha256 of the weight file the VAE came from
    tokenizer_identity: str
    scaling_factor: float
    latent_dtype: str = "float16"
    stores_std: bool = True
    latent_channels: int = 4
    latent_downscale: int = 8  # pixels per latent cell along each side
    model: str = ""  # the cache.model spec the latents came from
    chunks: list[ChunkInfo] = []
    bucket_counts: dict[str, int] = {}  # "<w>x<h>" -> rows cached
