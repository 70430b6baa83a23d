"""Contract of the eval stage: does a checkpoint produce the characters and artists it was trained on?

One results row per (checkpoint, concept). A concept is a character or artist with at least
`eval.min_samples` training images, or the fixed control set (kind "control"). Two detectors:

* tag — the WD tagger's probability of the concept's own tag on the generated images (hit: prob above the
  tag stage's character threshold). Only for concepts the tagger has a label for (WD has no artist tags and
  no fictional characters): otherwise the tag columns are null.
* probe — a nearest-centroid classifier over embeddings of the concept's training images, among the
  evaluated concepts of the same kind (hit: the generated image is closest to its own concept). Its chance
  level is 1/classes; `control_rate` is how often control images (prompts naming no concept) land on the
  concept, and lift = hit rate − control rate is what the prompt added.
"""
from __future__ import annotations

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from data_contracts.manifest import StageManifest

CONTRACT_VERSION = 1
STAGE = "eval"

KINDS = ("character", "artist", "control")
RESULTS_SCHEMA = pa.schema(
    [
        pa.field("checkpoint", pa.string(), nullable=False),  # EvalCheckpoint.id
        pa.field("run", pa.string()),  # train fingerprint, "base" or "extra"
        pa.field("objective", pa.string()),  # flow | ddpm
        pa.field("step", pa.int64()),  # optimiser steps behind the checkpoint (0 = base model)
        pa.field("kind", pa.string(), nullable=False),  # character | artist | control
        pa.field("concept", pa.string(), nullable=False),  # Danbooru tag (control: the prompt label)
        pa.field("prompt", pa.string()),
        pa.field("n_train", pa.int32()),  # training images carrying the concept
        pa.field("n_images", pa.int32()),  # images generated
        pa.field("tag_in_labels", pa.bool_()),
        pa.field("tag_hit_rate", pa.float32()),  # share of images with the concept's tag prob > threshold
        pa.field("tag_mean_prob", pa.float32()),
        pa.field("probe_hit_rate", pa.float32()),  # share of images the probe assigns to this concept
        pa.field("probe_chance", pa.float32()),  # 1 / classes of this kind
        pa.field("control_rate", pa.float32()),  # share of control images the probe assigns to this concept
        pa.field("lift", pa.float32()),  # probe_hit_rate − control_rate
        pa.field("probe_ref_accuracy", pa.float32()),  # leave-one-out accuracy on the training images
        pa.field("samples", pa.list_(pa.string())),  # a few generated PNGs, relative to the output folder
    ]
)
SCHEMAS = {"results": RESULTS_SCHEMA}


class EvalCheckpoint(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str  # short stable id, used in paths and the results table
    label: str  # legend entry of the plot
    spec: str  # what was loaded (a path inside the store, builtin:..., a user path)
    run: str  # train fingerprint, "base" or "extra"
    objective: str
    step: int


class EvalManifest(StageManifest):
    STAGE = STAGE
    CONTRACT_VERSION = CONTRACT_VERSION
    probe_space: str  # tagger | latent
    checkpoints: list[EvalCheckpoint] = []
    concepts: dict[str, list[str]] = {}  # kind -> concept tags evaluated
    plot: str | None = None  # relative path of the learning-curve PNG
