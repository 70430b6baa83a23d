"""Config of the eval stage: which concepts, how many images, how they are generated and detected.

The prompt template is the training template: count tag, character, series (characters) or count tag,
artist (artists), then `quality_tags`. The probe embeds images with the WD tagger ("tagger": logits of
the tag probabilities) or compares latents ("latent": generated latents vs the training images encoded by
the checkpoint's VAE). Use "latent" when the VAE or the tagger is a random stand-in (the demo): decoded
images of a random VAE carry nothing a tagger could recognise.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline_config.base import Section


class EvalConfig(Section):
    # --- what is evaluated --------------------------------------------------------------------
    kinds: list[Literal["character", "artist"]] = Field(default_factory=lambda: ["character", "artist"])
    min_samples: int = Field(20, ge=1)  # training images a concept needs to be evaluated
    max_concepts: int = Field(20, ge=1)  # per kind, most frequent first
    include_base: bool = True  # also evaluate the base model (step 0 of the learning curve)
    base_model: str | None = None  # None: the train config's `model`
    checkpoints: list[str] = []  # extra checkpoints (files, diffusers folders, step folders on base_model)
    compare: list[str] = []  # other train outputs (fingerprints) to evaluate the same way, e.g. an A/B run
    # Also evaluate each compared run's epoch exports (train.export_every_epochs), at the step each was made:
    # a learning curve along one run (the flow-vs-ε study). Out of the fingerprint while off.
    exports: bool = Field(False, exclude_if=lambda value: not value)

    # --- generation ---------------------------------------------------------------------------
    images_per_concept: int = Field(8, ge=1)  # K
    control_prompts: list[str] = Field(default_factory=lambda: [
        "1girl, solo, looking at viewer", "1boy, solo, upper body", "no humans, scenery"])
    quality_tags: list[str] = Field(default_factory=lambda: ["masterpiece", "good score"])
    negative_prompt: str = "worst score, bad score"
    steps: int = Field(28, ge=1)
    cfg_scale: float = Field(6.0, ge=0.0)
    shift: float | None = Field(None, gt=0)  # None: the checkpoint's recommended shift (else 3)
    sampler: Literal["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_sde"] = "euler"
    width: int = Field(512, ge=8, multiple_of=8)
    height: int = Field(768, ge=8, multiple_of=8)
    seed: int = 0
    batch_size: int = Field(8, ge=1)  # images a generation call, several concepts' images together

    # --- detection ----------------------------------------------------------------------------
    tagger: str | None = None  # None: the tag stage's tagger
    character_threshold: float | None = Field(None, ge=0.0, le=1.0)  # None: the tag stage's threshold
    probe_space: Literal["tagger", "latent"] = "tagger"
    reference_images: int = Field(32, ge=2)  # training images per concept the probe is fitted on
    samples_in_report: int = Field(4, ge=0)  # sample PNGs per concept linked in the report

    @model_validator(mode="after")
    def _check(self) -> "EvalConfig":
        if not self.kinds:
            raise ValueError("kinds must list at least one of character, artist")
        if not self.control_prompts:
            raise ValueError("control_prompts must hold at least one prompt (the control set)")
        return self
