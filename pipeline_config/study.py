"""Config of the flow-vs-ε study (`fm study`, tasks/study/): does flow matching learn new concepts faster?

The study mirrors the seed recipe's situation on a data set where the answer can be measured: a shared base is
ε-trained on the "old" concepts (every post carrying none of `new_characters` / `new_artists`), then two arms
start from its export and learn the "new" ones — the flow arm switching objective, the ε (ddpm) arm continuing —
on the same data, steps, batch, optimiser and seeds. Each arm exports `checkpoints` evenly spaced epoch exports,
and eval measures every one of them on new and old concepts and the control prompts.

The study is not a stage: it runs the stages (ingest .. eval) with the configs it derives (tasks/study/plan.py),
so every output is fingerprinted, cached and resumable as usual, and its report is written under
`<data_root>/study/<fingerprint>/`. This section is in no stage fingerprint.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline_config.base import Section
from pipeline_config.train import PhaseConfig


def _check_overrides(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The phase rules (bucket., cache., train. keys only), with the study key named in the message."""
    try:
        PhaseConfig(name=name, overrides=overrides)
    except ValueError as exc:
        raise ValueError(f"study.{name}: {exc}") from None
    return overrides


class StudyConfig(Section):
    # --- the concepts ---------------------------------------------------------------------------------
    new_characters: list[str] = []  # held out of the base, learned by both arms (Danbooru character tags)
    new_artists: list[str] = []  # likewise (artist tags); both lists empty: nothing to study
    # Posts of the new phase: those with none of the old characters (every other character tag of the data),
    # minus posts carrying one of these tags too (e.g. "original": posts without a character).
    new_exclude_tags: list[str] = []

    # --- the arms ---------------------------------------------------------------------------------------
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])  # train.seed of each arm's runs (>= 3 for intervals)
    checkpoints: int = Field(6, ge=2)  # evaluated exports per arm (the last is the final export); plus step 0
    epochs_per_checkpoint: int = Field(1, ge=1)  # an arm trains checkpoints × this many epochs of the new data
    # Overrides of the base phase and of both arms, as `train.phases` overrides (bucket., cache., train. keys).
    # The study sets itself: the objective (base and ε arm ddpm, flow arm flow), train.seed, train.model of the
    # arms (the base's export), train.epochs / max_steps / export_every_epochs of the arms, bucket.select.
    base: dict[str, Any] = {}
    arms: dict[str, Any] = {}
    # Build the random-weight SD1.5 of this scale (`fm models random --scale ...`) at train.model when that file
    # is missing and has the name that command gives it (sd15-random-small.safetensors, ...). Never touches a file
    # that exists: with a real checkpoint (-o train.model=... -o cache.model=...) it does nothing.
    random_model: Literal["", "tiny", "small", "full"] = ""

    # --- statistics -------------------------------------------------------------------------------------
    level: float = Field(0.5, gt=0.0, lt=1.0)  # steps-to-level: this fraction of the way from chance to the best
    bootstrap: int = Field(2000, ge=100)  # bootstrap replicates (seeds, then images within each seed)
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    stats_seed: int = 0  # the bootstrap's random generator
    sample_columns: int = Field(4, ge=1)  # new concepts shown per arm in the side-by-side samples

    @field_validator("base")
    @classmethod
    def _base(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _check_overrides("base", value)

    @field_validator("arms")
    @classmethod
    def _arms(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _check_overrides("arms", value)

    @field_validator("new_characters", "new_artists", "new_exclude_tags")
    @classmethod
    def _tags(cls, value: list[str]) -> list[str]:
        if any(not v.strip() for v in value):
            raise ValueError("tags must not be empty")
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _check(self) -> "StudyConfig":
        if len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be distinct non-negative integers (got {self.seeds})")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed (3 or more for intervals across seeds)")
        return self

    @property
    def new_tags(self) -> list[str]:
        return [*self.new_characters, *self.new_artists]
