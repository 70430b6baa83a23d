"""The study's configs (no stage runs): what the base, the new data, the arms and the evals are given."""
from __future__ import annotations

import pytest

from data_contracts.errors import ConfigError
from pipeline_config.load import load_config, section_dict
from tasks.study import plan

CHARS = {"a_(x)", "b_(x)", "c_(y)", "d_(y)"}
ARTISTS = {"p", "q", "r"}


def _cfg(**study):
    return load_config("demo", {"study.new_characters": ["c_(y)", "d_(y)"], "study.new_artists": ["r"],
                                "study.new_exclude_tags": ["original"], "study.checkpoints": 6,
                                "study.epochs_per_checkpoint": 2, **{f"study.{k}": v for k, v in study.items()}})


def test_base_and_new_data_split_the_concepts():
    cfg = _cfg(base={"train.max_steps": 50, "train.lr": 1e-4})
    split = plan.split_concepts(cfg, CHARS, ARTISTS)
    assert split.old_characters == ("a_(x)", "b_(x)") and split.old_artists == ("p", "q")
    base = plan.base_config(cfg, split)
    assert base.bucket.select.exclude_tags == ["c_(y)", "d_(y)", "r"]
    assert base.train.objective == "ddpm" and base.train.max_steps == 50 and base.train.lr == 1e-4
    assert base.train.run_name == "booruflow-demo-base" and base.train.phases == []
    new = plan.new_data_config(cfg, split)
    assert new.bucket.select.exclude_tags == ["a_(x)", "b_(x)", "original"]
    assert section_dict(new, "cache") == section_dict(cfg, "cache")
    assert plan.new_data_config(cfg, split, "/runs/base.safetensors").cache.model == "/runs/base.safetensors"


def test_the_arms_differ_only_in_the_objective_and_checkpoint_evenly():
    cfg = _cfg(arms={"train.lr": 3e-4})
    new = plan.new_data_config(cfg, plan.split_concepts(cfg, CHARS, ARTISTS))
    flow, eps = (plan.arm_config(new, arm, 1, "/runs/base.safetensors") for arm in plan.ARMS)
    assert flow.train.objective == "flow" and eps.train.objective == "ddpm"
    a, b = section_dict(flow, "train"), section_dict(eps, "train")
    assert {k for k in a if a[k] != b[k]} == {"objective", "run_name"}  # run_name: each its own exports
    t = flow.train
    assert (t.model, t.seed, t.lr, t.epochs, t.max_steps) == ("/runs/base.safetensors", 1, 3e-4, 12, None)
    assert t.export_every_epochs == 2 and t.keep_exports == 0  # exports at epochs 2..10 + the final one at 12
    assert (flow.train.run_name, eps.train.run_name) == ("booruflow-demo-flow-s1", "booruflow-demo-ddpm-s1")
    assert section_dict(flow, "bucket") == section_dict(new, "bucket")  # the same data for every arm and seed
    with pytest.raises(ValueError, match="arm"):
        plan.arm_config(new, "v-pred", 0, "/x")


def test_each_seed_is_evaluated_on_its_own_image_seeds_with_the_exports():
    cfg = _cfg()
    new = plan.new_data_config(cfg, plan.split_concepts(cfg, CHARS, ARTISTS))
    evs = [plan.eval_config(plan.arm_config(new, "flow", s, "/b"), s, f"ddpm{s}") for s in (0, 1, 2)]
    k = cfg.eval.images_per_concept
    assert [e.eval.seed for e in evs] == [0, k, 2 * k]  # disjoint: each draws seeds seed .. seed + k - 1
    assert all(e.eval.exports and e.eval.include_base for e in evs)
    assert evs[1].eval.compare == ["ddpm1"]
    assert "exports" not in section_dict(cfg, "eval")  # off: out of every existing eval's fingerprint


def test_config_errors_name_what_to_change():
    with pytest.raises(ConfigError, match="study.new_characters"):
        plan.check_study(load_config("demo"))
    cfg = _cfg()
    with pytest.raises(ConfigError, match="not found in the data"):
        plan.split_concepts(cfg, {"a_(x)"}, ARTISTS)
    with pytest.raises(ConfigError, match="cache.model"):
        plan.check_study(load_config("demo", {"study.new_artists": ["r"], "cache.model": "/x.safetensors"}))
    with pytest.raises(ConfigError, match="study.base"):
        load_config("demo", {"study.base": {"eval.steps": 3}})  # a phase changes bucket, cache, train only
    with pytest.raises(ConfigError, match="distinct"):
        load_config("demo", {"study.seeds": [0, 0]})


def test_the_ab_study_preset_is_sized_as_it_says():
    cfg = load_config("ab-study")
    plan.check_study(cfg)
    s = cfg.study
    assert len(s.seeds) >= 3 and s.checkpoints >= 6 and s.random_model == "small"
    assert cfg.train.model == cfg.cache.model and cfg.train.model.endswith("sd15-random-small.safetensors")
    assert set(cfg.eval.kinds) == {"character", "artist"} and cfg.eval.max_concepts >= 14
    base, arm = plan.preview_configs(cfg)
    assert base.train.objective == "ddpm" and base.train.max_steps == 3000
    assert arm.train.epochs == s.checkpoints * s.epochs_per_checkpoint and arm.train.max_steps is None
    over = load_config("ab-study", ["train.model=/m/nai.safetensors", "cache.model=/m/nai.safetensors"])
    plan.check_study(over)  # a real checkpoint: the same study, nothing else to change


def test_the_small_scale_is_sd15_layout_at_reduced_width():
    from tasks.models.random_models import SCALES, codec_vae, output_name, sd15_configs
    from tasks.study.models import config_param_counts

    assert "small" in SCALES and codec_vae("small") and not codec_vae("tiny")
    assert output_name("sd15", "small") == "sd15-random-small.safetensors"
    small, full = sd15_configs("small"), sd15_configs("full")
    same = ("down_block_types", "up_block_types", "layers_per_block", "attention_head_dim")
    assert all(small["unet"][k] == full["unet"][k] for k in same)
    assert small["unet"]["block_out_channels"] == [128, 256, 512, 512]
    assert small["unet"]["cross_attention_dim"] == small["text_encoder"]["hidden_size"] == 512
    unet, text = config_param_counts("small")
    assert 120 < unet < 160 and 30 < text < 60


def test_only_the_random_codec_model_has_its_caches_made_on_the_cpu():
    from tasks.study.models import codec_model

    cfg = load_config("ab-study")
    assert codec_model(cfg)  # the small random model: its codec VAE is exact in fp32 only
    real = load_config("ab-study", ["train.model=/m/nai.safetensors", "cache.model=/m/nai.safetensors"])
    assert not codec_model(real)
    assert plan.on_cpu(cfg).runtime.device == "cpu" and section_dict(plan.on_cpu(cfg), "cache") == \
        section_dict(cfg, "cache")  # the same cache output, encoded in fp32
