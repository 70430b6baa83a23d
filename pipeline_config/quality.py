"""Config of the quality stage: popularity signals -> one of four quality labels per sample.

Every signal is turned into a within-year percentile rank (years with fewer than
`min_posts_per_year` posts are pooled with neighbouring years), because Danbooru scores inflate
over the years. `norm_score` is the within-year percentile of the weighted mean of those ranks.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from pipeline_config.base import Section

# Post fields that can act as popularity signals. All are "higher is better" (down_score is <= 0).
SIGNAL_COLUMNS = ("score", "fav_count", "up_score", "down_score")


class QualityConfig(Section):
    # kmeans: k=4 clusters over the weighted signal ranks, ordered by mean norm_score.
    # percentile: fixed cut points on norm_score.
    method: Literal["kmeans", "percentile"] = "kmeans"
    # signal -> weight (> 0): the weight scales the signal's rank in the kmeans features and in
    # the popularity mix that norm_score ranks. A row missing a listed signal is rejected.
    signals: dict[str, float] = Field(
        default_factory=lambda: {"score": 1.0, "fav_count": 1.0, "up_score": 0.5, "down_score": 0.5}
    )
    # Extra numeric columns of the ingest posts or tag tables (e.g. tag_weight) -> weight.
    # They join the kmeans feature vector (ranked within year like the signals), not norm_score.
    extra_features: dict[str, float] = Field(default_factory=dict)
    min_posts_per_year: int = Field(100, ge=1)
    # norm_score cut points between worst|bad|good|masterpiece for method=percentile.
    percentile_cuts: tuple[float, float, float] = (0.3, 0.6, 0.9)
    seed: int = 0  # kmeans random_state (part of the fingerprint, unlike the top-level seed)
    n_init: int = Field(10, ge=1)
    examples_per_label: int = Field(8, ge=0)

    @field_validator("signals")
    @classmethod
    def _check_signals(cls, value: dict[str, float]) -> dict[str, float]:
        if not value:
            raise ValueError(f"list at least one signal of {', '.join(SIGNAL_COLUMNS)}")
        for name, weight in value.items():
            if name not in SIGNAL_COLUMNS:
                raise ValueError(f"unknown signal {name!r}; choose from {', '.join(SIGNAL_COLUMNS)}")
            if not weight > 0:
                raise ValueError(f"signal {name!r}: weight must be > 0 (remove the signal to turn it off)")
        return value

    @field_validator("extra_features")
    @classmethod
    def _check_extra(cls, value: dict[str, float]) -> dict[str, float]:
        for name, weight in value.items():
            if name in SIGNAL_COLUMNS or name == "id":
                raise ValueError(f"extra feature {name!r} is a signal or the id; list signals under 'signals'")
            if not weight > 0:
                raise ValueError(f"extra feature {name!r}: weight must be > 0")
        return value

    @field_validator("percentile_cuts")
    @classmethod
    def _check_cuts(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if not (0.0 < value[0] < value[1] < value[2] < 1.0):
            raise ValueError("percentile_cuts must be three increasing values strictly between 0 and 1")
        return value
