"""The configs of the study's stage runs, derived from one pipeline config and its `study` section.

* base   — ε (ddpm) on the old concepts: `bucket.select.exclude_tags` = the new characters and artists, then the
           `study.base` overrides; trains from `train.model`;
* new    — the new phase's data: `bucket.select.exclude_tags` = every other character tag of the data (the old
           characters) + `study.new_exclude_tags`, so a post is in it when all its characters are new ones; its
           cache encodes with the base's export (cache.model = the model the arms train from, as everywhere);
* arms   — the new data, `study.arms` overrides, train.model = the base's export, the same seed, data, steps,
           batch and optimiser for both; only `train.objective` differs (flow | ddpm). They train
           `checkpoints × epochs_per_checkpoint` epochs with an epoch export every `epochs_per_checkpoint`, so
           each arm has `checkpoints` evenly spaced checkpoints (the last is the final export);
* eval   — per training seed: the flow arm as upstream, the ddpm arm in `eval.compare`, every epoch export
           evaluated (`eval.exports`), the base included (step 0, sampled as each arm samples), image seeds
           disjoint between training seeds.

Each config keeps the run's name and gets a run name of its own (`<run>-base`, `<run>-flow-s0`), so every
train output is its own fingerprint and its exports say what they are.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from data_contracts.errors import ConfigError
from pipeline_config.load import set_dotted, validate_config
from pipeline_config.schema import PipelineConfig
from tasks.eval.ab import OBJECTIVES

ARMS = OBJECTIVES  # ("flow", "ddpm"), as the A/B run: the flow arm switches objective, the ε arm continues
BASE_OBJECTIVE = "ddpm"


@dataclass(frozen=True)
class ConceptSplit:
    """Which tags of the data are new and which old, per kind."""

    new_characters: tuple[str, ...]
    new_artists: tuple[str, ...]
    old_characters: tuple[str, ...]
    old_artists: tuple[str, ...]

    def group(self, tag: str) -> str:
        return "new" if tag in self.new_characters or tag in self.new_artists else "old"


def split_concepts(cfg: PipelineConfig, characters: set[str], artists: set[str]) -> ConceptSplit:
    """The split for the character and artist tags found in the data; a new tag the data lacks is an error."""
    study = cfg.study
    if not study.new_tags:
        raise ConfigError("study: set study.new_characters and/or study.new_artists (the concepts held out of the "
                          "base and learned by both arms)")
    missing = [t for t in study.new_characters if t not in characters] + \
              [t for t in study.new_artists if t not in artists]
    if missing:
        raise ConfigError(f"study: {', '.join(map(repr, missing))} not found in the data (characters: "
                          f"{', '.join(sorted(characters)) or 'none'}; artists: {', '.join(sorted(artists)) or 'none'})")
    return ConceptSplit(tuple(study.new_characters), tuple(study.new_artists),
                        tuple(sorted(characters - set(study.new_characters))),
                        tuple(sorted(artists - set(study.new_artists))))


def run_name(cfg: PipelineConfig) -> str:
    from tasks.train.export import resolve_run_name

    return resolve_run_name(cfg.train, cfg.name)


def _derive(cfg: PipelineConfig, overrides: dict[str, Any], fixed: dict[str, Any], where: str) -> PipelineConfig:
    """cfg with the user's overrides, then the study's own settings (which win), validated."""
    tree = cfg.model_dump(mode="json")
    tree["train"]["phases"] = []
    for key, value in {**overrides, **fixed}.items():
        set_dotted(tree, key, value)
    return validate_config(tree, where)


def _select(cfg: PipelineConfig, exclude: list[str], overrides: dict[str, Any]) -> dict[str, Any]:
    """bucket.select with the study's exclusions added to what the config (and its overrides) select."""
    select = cfg.bucket.select.model_dump(mode="json")
    for key, value in overrides.items():
        if key.startswith("bucket.select."):
            select[key.removeprefix("bucket.select.")] = value
    select["exclude_tags"] = list(dict.fromkeys([*select.get("exclude_tags", []), *exclude]))
    return select


def base_config(cfg: PipelineConfig, split: ConceptSplit) -> PipelineConfig:
    """The shared base: ε on every post that carries no new concept, from train.model."""
    study = cfg.study
    return _derive(cfg, study.base, {
        "bucket.select": _select(cfg, [*split.new_characters, *split.new_artists], study.base),
        "train.objective": BASE_OBJECTIVE,
        "train.run_name": f"{run_name(cfg)}-base",
        "train.phase": "",
    }, "study.base")


def new_data_config(cfg: PipelineConfig, split: ConceptSplit, base_export: str | None = None) -> PipelineConfig:
    """The new phase's data (bucket and cache): posts whose characters are all new ones, encoded by the model the
    arms start from (`base_export`; its VAE is the base's own, which training leaves as it was)."""
    study = cfg.study
    fixed: dict[str, Any] = {"bucket.select": _select(cfg, [*split.old_characters, *study.new_exclude_tags],
                                                       study.arms)}
    if base_export is not None:
        fixed["cache.model"] = base_export
    return _derive(cfg, study.arms, fixed, "study.arms")


def arm_config(new: PipelineConfig, arm: str, seed: int, base_export: str) -> PipelineConfig:
    """One arm at one seed: the new data, from the base's export, `checkpoints` evenly spaced epoch exports."""
    if arm not in ARMS:
        raise ValueError(f"arm {arm!r}: expected one of {', '.join(ARMS)}")
    study = new.study
    every = study.epochs_per_checkpoint
    return _derive(new, {}, {
        "train.objective": arm,
        "train.seed": seed,
        "train.model": base_export,
        "train.epochs": study.checkpoints * every,
        "train.max_steps": None,  # whole epochs: every checkpoint after the same share of the data
        "train.export_every_epochs": every,
        "train.keep_exports": 0,
        "train.run_name": f"{run_name(new)}-{arm}-s{seed}",
        "train.phase": "",
    }, f"study arm {arm} seed {seed}")


def on_cpu(cfg: PipelineConfig) -> PipelineConfig:
    """The same config run on the CPU (runtime is in no stage fingerprint: the same output, encoded in fp32)."""
    return cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"device": "cpu"})}, deep=True)


def eval_config(flow: PipelineConfig, seed: int, ddpm_fingerprint: str) -> PipelineConfig:
    """The eval of one seed's two arms (upstream train: the flow arm; compared: the ddpm arm)."""
    ev = flow.eval
    # Disjoint image seeds per training seed (each eval draws seeds eval.seed .. + images_per_concept - 1),
    # the same for both arms of a seed: arms are compared on the same noise.
    first = ev.seed + seed * ev.images_per_concept
    compare = list(dict.fromkeys([*ev.compare, ddpm_fingerprint]))
    return _derive(flow, {}, {"eval.compare": compare, "eval.exports": True, "eval.include_base": True,
                              "eval.seed": first}, f"study eval seed {seed}")


def preview_configs(cfg: PipelineConfig) -> tuple[PipelineConfig, PipelineConfig]:
    """(base, arm) train settings as the study will run them, before any data exists (no data selection, the
    config's own train.model): what the report's setup says ahead of a run."""
    study = cfg.study
    base = _derive(cfg, study.base, {"train.objective": BASE_OBJECTIVE}, "study.base")
    arm = _derive(cfg, study.arms, {"train.epochs": study.checkpoints * study.epochs_per_checkpoint,
                                    "train.max_steps": None}, "study.arms")
    return base, arm


def check_study(cfg: PipelineConfig) -> None:
    """What must hold before anything runs (the rest is checked by the stages' own configs)."""
    study = cfg.study
    if not study.new_tags:
        split_concepts(cfg, set(), set())  # raises the message naming the keys to set
    if cfg.cache.model != cfg.train.model:
        raise ConfigError(f"study: cache.model ({cfg.cache.model}) must equal train.model ({cfg.train.model}): the "
                          "base trains on latents of the model it starts from")
    overlap = set(study.new_characters) & set(study.new_exclude_tags)
    if overlap:
        raise ConfigError(f"study: {sorted(overlap)} both new characters and in study.new_exclude_tags")
    kinds = set(cfg.eval.kinds)
    if study.new_characters and "character" not in kinds or study.new_artists and "artist" not in kinds:
        raise ConfigError(f"study: eval.kinds {sorted(kinds)} must include the kinds of the new concepts")
