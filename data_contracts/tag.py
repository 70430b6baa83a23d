"""Contract of the tag stage: tagger-upsampled tags with provenance, ratings, tag-rarity weight."""
from __future__ import annotations

import pyarrow as pa

from data_contracts.manifest import StageManifest
from data_contracts.tables import REJECTS_SCHEMA

CONTRACT_VERSION = 1
STAGE = "tag"

RATING_NAMES = ("general", "sensitive", "questionable", "explicit")
_tag_prob = pa.list_(pa.struct([pa.field("tag", pa.string()), pa.field("prob", pa.float32())]))
TAGS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("general", pa.list_(pa.string())),  # final general tags (Danbooru ∪ tagger − blacklist)
        pa.field("character", pa.list_(pa.string())),  # final character tags
        pa.field("added", _tag_prob),  # tags the tagger added, with probability
        pa.field("disputed", _tag_prob),  # Danbooru tags the tagger strongly disagreed with
        pa.field("rating_probs", pa.list_(pa.float32(), 4)),  # in RATING_NAMES order, never thresholded
        pa.field("rating", pa.string()),  # argmax of rating_probs
        pa.field("tag_weight", pa.float32()),  # tag-rarity loss weight, mean 1 over the dataset
    ]
)
SCHEMAS = {"tags": TAGS_SCHEMA, "rejects": REJECTS_SCHEMA}


class TagManifest(StageManifest):
    STAGE = STAGE
    CONTRACT_VERSION = CONTRACT_VERSION
    model_name: str
    model_identity: str  # sha256 of the tagger weight file
    backend: str  # onnx | torch
    thresholds: dict[str, float | str]
