"""Config of the dedup stage: near-duplicate posts (colour variants, crops, re-encodes, parent/child sets).

A post's perceptual hash (64-bit pHash) is compared with every other's; two posts within `max_distance` bits
are one group, and so are a parent and its child within `parent_distance` (Danbooru's parent_id says they
belong together, so a looser bound is safe). Each group keeps one post: highest score, then the larger
image, then the newest (highest id); the others become rejects. `max_distance: 0` keeps only exact
(hash-equal) duplicates out; `enabled: false` keeps every post (hashes are still recorded).
"""
from __future__ import annotations

from pydantic import Field, model_validator

from pipeline_config.base import Section, execution_field


class DedupConfig(Section):
    enabled: bool = True
    # Bits of 64 (a pHash has 32 set bits: distances are even). Measured on 150 varied rendered pictures
    # (tests/dedup, bench/bench_dedup.py): re-encodes, resizes and colour variants land within 4 (>= 99 %), a
    # 2-4 % crop within 6 for 80-91 %; distinct pictures within 6 for 0.09 % of pairs (within 8: 0.13 %, and
    # false pairs chain through a group), so 6. Pictures from few templates (the mini-booru) need 4.
    max_distance: int = Field(6, ge=0, le=32)
    parent_distance: int = Field(12, ge=0, le=32)  # parent/child (parent_id): 99-100 % of 3-4 % crops
    workers: int = execution_field(0, ge=0)  # hashing processes (0: one per core)
    sheet_groups: int = Field(12, ge=1)  # contact sheet: the largest groups

    @model_validator(mode="after")
    def _check_parent_distance(self) -> "DedupConfig":
        if self.parent_distance < self.max_distance:
            raise ValueError(f"dedup.parent_distance ({self.parent_distance}) is below dedup.max_distance "
                             f"({self.max_distance}): a parent/child hint must not be stricter than no hint")
        return self
