"""Config of the bucket stage: kohya-compatible aspect-ratio buckets, crop, flip, small-bucket merging.

Defaults are kohya's (area 512², step 64, sides 256..1024 -> 17 buckets). The minimum bucket size
is this stage's own knob: `min_bucket_samples`, or batch_size × world_size when it is unset. These
mirror the training batch but are not read from the train section (a stage's fingerprint covers only
its own section), so set them to the train stage's per-GPU batch and GPU count.

`select` picks the posts a phase trains on (issue #22: e.g. a high-resolution phase on masterpiece /
good score posts of at least 1 MP); the rest become rejects "not_selected" before bucketing. Its
defaults select everything and leave it out of the stage fingerprint.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from data_contracts.quality import QUALITY_LABELS
from pipeline_config.base import Section

RATINGS = ("g", "s", "q", "e")
TAG_COLUMNS = ("tags_general", "tags_character", "tags_copyright", "tags_artist", "tags_meta")


class BucketSelect(Section):
    """Which posts the bucket stage keeps; every rule that is set must hold (defaults select all)."""

    quality_labels: list[str] = []  # the quality stage's label in these; empty = every label
    min_pixels: int = Field(0, ge=0)  # width × height of the original at least this (1024*1024: 1 MP)
    min_side: int = Field(0, ge=0)  # short side of the original at least this
    ratings: list[str] = []  # g / s / q / e; empty = every rating
    require_tags: list[str] = []  # each present in one of the post's tag columns (general .. meta)
    exclude_tags: list[str] = []  # none of these in any tag column

    @field_validator("quality_labels")
    @classmethod
    def _check_labels(cls, value: list[str]) -> list[str]:
        bad = [v for v in value if v not in QUALITY_LABELS]
        if bad:
            raise ValueError(f"unknown quality label(s) {', '.join(map(repr, bad))}; valid: "
                             + ", ".join(map(repr, QUALITY_LABELS)))
        return list(dict.fromkeys(value))

    @field_validator("ratings")
    @classmethod
    def _check_ratings(cls, value: list[str]) -> list[str]:
        bad = [v for v in value if v not in RATINGS]
        if bad:
            raise ValueError(f"unknown rating(s) {', '.join(map(repr, bad))}; valid: " + ", ".join(map(repr, RATINGS)))
        return list(dict.fromkeys(value))

    @field_validator("require_tags", "exclude_tags")
    @classmethod
    def _check_tags(cls, value: list[str]) -> list[str]:
        if any(not v.strip() for v in value):
            raise ValueError("tags must not be empty")
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _check_overlap(self) -> "BucketSelect":
        both = sorted(set(self.require_tags) & set(self.exclude_tags))
        if both:
            raise ValueError(f"tag(s) {', '.join(map(repr, both))} both required and excluded: nothing could be selected")
        return self

    @property
    def active(self) -> bool:
        return self != BucketSelect()


class BucketConfig(Section):
    resolution: int = Field(512, ge=1)  # bucket area = resolution²
    step: int = Field(64, ge=1)  # every bucket side is a multiple of step
    min_side: int = Field(256, ge=1)  # smallest bucket side (predefined buckets)
    max_side: int = Field(1024, ge=1)  # largest bucket side
    # no_upscale: kohya's bucket_no_upscale — each image gets its own bucket no larger than the image
    # (area <= resolution², sides <= max_side, floored to step) instead of the predefined set.
    no_upscale: bool = False
    crop: Literal["center", "random"] = "center"  # random: reproducible from (seed, post id)
    flip_prob: float = Field(0.0, ge=0.0, le=1.0)  # probability of the per-sample horizontal flip flag
    seed: int = 0
    # Images whose short side is below min_image_side: rejected ("too_small") or kept and upscaled.
    min_image_side: int = Field(256, ge=0)
    small_images: Literal["reject", "upscale"] = "reject"
    # Reject images whose |ln(aspect) - ln(bucket aspect)| exceeds this (e.g. 0.5); None keeps all.
    max_log_ar_error: float | None = Field(None, gt=0)
    # Buckets with fewer samples than the threshold: merge into the nearest bucket by aspect ratio,
    # drop their samples (rejects "small_bucket"), or keep them as they are.
    small_buckets: Literal["merge", "drop", "keep"] = "merge"
    batch_size: int = Field(1, ge=1)
    world_size: int = Field(1, ge=1)
    min_bucket_samples: int | None = Field(None, ge=1)  # overrides batch_size × world_size
    histogram_bins: int = Field(32, ge=1)  # aspect-ratio histogram bins over log2(w/h) in [-2, 2]
    # Data selection of a training phase (BucketSelect). Left out of the fingerprint while it selects
    # everything: outputs made before this option keep their fingerprints.
    select: BucketSelect = Field(default_factory=BucketSelect, exclude_if=lambda value: not value.active)

    @property
    def area(self) -> int:
        return self.resolution * self.resolution

    @property
    def bucket_threshold(self) -> int:
        return self.min_bucket_samples or self.batch_size * self.world_size

    @model_validator(mode="after")
    def _check_sides(self) -> "BucketConfig":
        if self.min_side % self.step or self.max_side % self.step:
            raise ValueError(f"min_side ({self.min_side}) and max_side ({self.max_side}) must be multiples of step ({self.step})")
        if not self.min_side <= self.resolution <= self.max_side:
            raise ValueError(f"need min_side <= resolution <= max_side, found {self.min_side}, {self.resolution}, {self.max_side}")
        if self.resolution < self.step:
            raise ValueError(f"resolution ({self.resolution}) must be at least step ({self.step})")
        return self
