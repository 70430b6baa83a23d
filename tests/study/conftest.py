"""The study's end-to-end test runs the real stages on a small mini-booru with the builtin tiny SD1.5 (CPU)."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

NEW_CHARACTER = "kuroe_rin_(houkago_diary)"
NEW_ARTIST = "hoshizora_pen"


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """2 shared cores: one intra-op thread avoids oversubscription (as tests/eval)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def study_config(root: Path, **sections):
    """200 posts at 128 px; eval keeps the 4 most frequent characters and artists (the new ones among them)."""
    from pipeline_config.load import validate_config

    tree = {
        "name": "study-test",
        "data_root": str(root / "data"),
        "runtime": {"device": "cpu", "cache_dir": str(root / "cache")},
        "ingest": {"embedded": {"posts": 200, "seed": 0, "max_side": 128}, "queries": [{"tags": ""}],
                   "filters": {"min_width": 0, "min_height": 0}, "min_per_character": 0},
        "dedup": {"enabled": False},
        "tag": {"batch_size": 32},
        "quality": {"min_posts_per_year": 1},
        "bucket": {"resolution": 64, "step": 32, "min_side": 32, "max_side": 128, "min_image_side": 0,
                   "batch_size": 8},
        "cache": {"store_std": False},
        "train": {"batch_size": 8, "grad_accum": 1, "max_steps": 6, "lr": 1e-3, "warmup": 0.0, "optimizer": "adamw",
                  "mixed_precision": "no", "checkpoint_every": 10000, "validation": {"fraction": 0.0},
                  "sampling": {"prompts": []}, "logging": {"every": 5, "tensorboard": False},
                  "export_diffusers": False, "launcher": "inprocess", "shuffle_buffer": 64, "prefetch": 2,
                  "export_dtype": "fp32"},
        "eval": {"kinds": ["character", "artist"], "min_samples": 8, "max_concepts": 3, "images_per_concept": 2,
                 "steps": 2, "width": 64, "height": 64, "probe_space": "latent", "reference_images": 6,
                 "control_prompts": ["1girl, solo"], "batch_size": 4, "samples_in_report": 1},
        "study": {"new_characters": [NEW_CHARACTER], "new_artists": [NEW_ARTIST], "seeds": [0, 1],
                  "checkpoints": 3, "epochs_per_checkpoint": 1, "bootstrap": 200},
    }
    for name, upd in sections.items():
        tree[name] = {**tree.get(name, {}), **upd}
    return validate_config(tree, "study test config")


def stage_runner(store):
    """run(stage, cfg) -> StageOutcome through the real stages, in this process."""
    from tasks.common.stage import run_stage

    return lambda stage, cfg: run_stage(importlib.import_module(f"tasks.{stage}.stage").SPEC, cfg, store)
