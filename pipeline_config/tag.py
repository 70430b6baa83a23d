"""Config of the tag stage: which WD tagger, how it runs, how its tags merge, and the tag-rarity weight."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline_config.base import Section, execution_field

BUILTIN_TINY = "builtin:tiny-wd-swinv2"


class TagWeightConfig(Section):
    """Per-sample loss weight from the rarity of its concepts (see tasks/tag/weights.py for the formula).

    raw_i = geometric mean over the sample's concept categories of f(count of its rarest tag there), where
    count = samples of the final dataset carrying the tag and f = count**-alpha (power) or 1/log2(1+count)
    (log). Samples with no tag in `categories` fall back to `fallback` (general: geometric mean of their
    general-tag counts). Weights = clip(s * raw, bounds) with s chosen so the mean is exactly 1.
    """

    method: Literal["power", "log", "none"] = "power"
    alpha: float = Field(0.5, gt=0.0, le=4.0)  # exponent of the power method (0.5 = inverse square root)
    categories: list[Literal["character", "artist", "copyright"]] = ["character", "artist", "copyright"]
    fallback: Literal["general", "none"] = "general"  # none: samples without concepts get raw weight 1
    bounds: tuple[float, float] = (0.5, 2.0)
    report_top: int = Field(20, ge=1)  # rows of the top/bottom concept tables

    @field_validator("bounds")
    @classmethod
    def _bounds_hold_one(cls, value: tuple[float, float]) -> tuple[float, float]:
        lo, hi = value
        if not (0.0 < lo <= 1.0 <= hi):
            raise ValueError(f"bounds must satisfy 0 < low <= 1 <= high so the mean can be 1; found {list(value)}")
        return value


class TagConfig(Section):
    # A tagger folder (selected_tags.csv + model.onnx and/or model.safetensors + config.json), a Hugging Face
    # repo id (only when online), or builtin:tiny-wd-swinv2[?seed=N] (random tiny SwinV2 for demos/tests).
    model: str = BUILTIN_TINY
    backend: Literal["auto", "onnx", "torch"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False  # torch.compile the torch backend (GPU; pays a warm-up once)
    batch_size: int = Field(32, ge=1)
    shard_size: int = Field(2048, ge=1)  # images per journaled shard (a kill loses at most one shard)
    workers: int = Field(2, ge=1)  # threads reading and decoding image files
    # Worker processes the shards are spread over: 0 = one per visible GPU on CUDA (this process alone on
    # the CPU); N = the first N GPUs, or N CPU processes (each its own model copy) when the device is cpu.
    processes: int = execution_field(0, ge=0)

    # Tags are kept when prob > threshold (strictly greater), as the WD reference does.
    general_threshold: float = Field(0.35, ge=0.0, le=1.0)
    character_threshold: float = Field(0.85, ge=0.0, le=1.0)
    mode: Literal["threshold", "mcut"] = "threshold"  # mcut: per-image, per-category largest-gap cut
    character_mcut_floor: float = Field(0.15, ge=0.0, le=1.0)
    blacklist: list[str] = []  # tags never stored (Danbooru spelling, underscores)
    add_characters: bool = True  # add tagger characters above character_threshold
    disagree_below: float = Field(0.05, ge=0.0, le=1.0)  # Danbooru tags with tagger prob below: disputed
    weight: TagWeightConfig = TagWeightConfig()

    @field_validator("model")
    @classmethod
    def _model_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("tag.model must name a tagger folder, a Hugging Face repo id or builtin:tiny-wd-swinv2")
        return value.strip()

    @field_validator("blacklist")
    @classmethod
    def _blacklist_spelling(cls, value: list[str]) -> list[str]:
        # Stored tags keep Danbooru spelling; accept `long hair` for convenience.
        return sorted({t.strip().replace(" ", "_") for t in value if t.strip()})

    @model_validator(mode="after")
    def _compile_needs_torch(self) -> "TagConfig":
        if self.compile and self.backend == "onnx":
            raise ValueError("tag.compile applies to the torch backend; set tag.backend to torch or auto")
        return self
