"""The gpu-check preset (one H100, real shapes, the whole DAG) and the mini-booru options it needs.

CPU only, no rendering at preset scale: the mini-booru plans its sizes without drawing (`planned_sizes`), and the
bucket and batch logic are the project's own (tasks/bucket/core.py, tasks/cache/chunks.py, tasks/cache/reader.py).
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from minibooru.generate import MARKER, generate_minibooru, planned_sizes

from pipeline_config.load import load_config
from tasks.bucket.core import Bucket, assign, make_buckets

MODELS = ["tag.model=/m/wd-swinv2-tagger-v3-random", "cache.model=/m/sd15-random.safetensors",
          "train.model=/m/sd15-random.safetensors"]
# Roles whose posts the preset's filters reject whatever their size: unsupported file types, excluded tags
# (animated, video, comic).
REJECTED_ROLES = {"gif", "mp4", "zip", "swf", "comic"}


@pytest.fixture(scope="module")
def cfg():
    return load_config("gpu-check", MODELS)


@pytest.fixture(scope="module")
def kept(cfg) -> list[dict]:
    """The planned posts of the preset's mini-booru that pass its ingest filters (by role, status and size)."""
    emb, filters = cfg.ingest.embedded, cfg.ingest.filters
    plan = planned_sizes(emb.posts, emb.seed, max_side=emb.max_side, aspect=emb.aspect)
    return [p for p in plan
            if p["role"] not in REJECTED_ROLES and not p["restricted"]
            and not (p["deleted"] and filters.exclude_deleted) and not (p["banned"] and filters.exclude_banned)
            and p["width"] >= filters.min_width and p["height"] >= filters.min_height]


@pytest.fixture(scope="module")
def assignment(cfg, kept):
    ids = np.array([p["id"] for p in kept])
    return assign(ids, np.array([p["width"] for p in kept]), np.array([p["height"] for p in kept]), cfg.bucket,
                  make_buckets(cfg.bucket))


def test_the_preset_loads_with_the_model_overrides_and_keeps_the_recipe_settings(cfg):
    assert cfg.name == "gpu-check" and cfg.runtime.device == "cuda"
    assert cfg.tag.model == "/m/wd-swinv2-tagger-v3-random"
    assert cfg.cache.model == cfg.train.model == "/m/sd15-random.safetensors"
    emb = cfg.ingest.embedded
    assert cfg.ingest.api.base_url == "embedded:minibooru"
    assert emb.posts >= 3000 and emb.aspect == "danbooru" and emb.max_side == cfg.bucket.max_side
    assert cfg.ingest.filters.min_width <= cfg.bucket.min_image_side  # a 1:4 strip reaches the bucket stage

    recipe = load_config("nai-v2-fm")
    same = ("objective", "shift", "timestep_sampling", "batch_size", "grad_accum", "lr", "warmup", "optimizer",
            "max_grad_norm", "mixed_precision", "compile", "compile_mode", "compile_strategy", "channels_last",
            "attention_backend", "caption_dropout", "max_chunks", "clip_skip", "train_text_encoder", "export_dtype",
            "export_diffusers", "recommended_shift")
    assert {k: getattr(cfg.train, k) for k in same} == {k: getattr(recipe.train, k) for k in same}
    assert cfg.train.compile_mode == "reduce-overhead"
    assert cfg.train.ema.enabled and cfg.train.validation.fraction > 0 and cfg.train.sampling.prompts
    assert 0 < cfg.train.sampling.every < cfg.train.max_steps and 0 < cfg.train.validation.every < cfg.train.max_steps
    for k in ("resolution", "step", "min_side", "max_side", "min_image_side", "crop"):
        assert getattr(cfg.bucket, k) == getattr(recipe.bucket, k)
    assert len(make_buckets(cfg.bucket)) == 17
    assert (cfg.bucket.batch_size, cfg.bucket.world_size) == (cfg.train.batch_size, 1)  # one GPU
    # the tagger at 448 px is the model's own input size (wd-swinv2-tagger-v3 layout); eval is real-sized but small
    assert (cfg.eval.width, cfg.eval.height, cfg.eval.probe_space) == (512, 768, "tagger")
    assert cfg.eval.max_concepts * len(cfg.eval.kinds) * cfg.eval.images_per_concept <= 32


def test_unset_models_stop_the_preflight_naming_the_override(tmp_path):
    from flows.preflight import check_models
    from tasks.registry import implemented_stages

    bare = load_config("gpu-check")  # loads: every preset must (tests/contracts/test_config.py)
    findings = check_models(bare, implemented_stages())
    errors = {f.check: f.message for f in findings if f.level == "error"}
    assert set(errors) == {"tag.model", "cache.model", "train.model"}
    assert not [f for f in findings if f.level == "warn"]  # one placeholder for cache and train: no VAE warning
    for key, message in errors.items():
        assert "does not exist" in message and f"-o {key}=PATH" in message


def test_the_preset_sizes_fill_at_least_14_of_the_17_buckets(cfg, kept, assignment):
    assert len(kept) >= 3000
    assert not assignment.rejects  # none too small for min_image_side
    buckets = make_buckets(cfg.bucket)
    assert len(assignment.initial_counts) >= 14
    final = assignment.final_counts()
    assert len(final) >= 14 and set(final) <= set(buckets)  # and none merged away (threshold = batch_size)
    assert min(final.values()) >= 1.5 * cfg.bucket.bucket_threshold  # a margin over the merge threshold
    # Danbooru-like: mostly portrait, some square, some landscape, few extremes (beyond 1:2 / 2:1)
    ratio = np.array([p["width"] / p["height"] for p in kept])
    portrait, square, landscape = (ratio < 0.95).mean(), ((ratio >= 0.95) & (ratio <= 1.05)).mean(), (ratio > 1.05).mean()
    assert portrait > 0.55 and 0.08 < square < 0.2 and 0.15 < landscape < 0.35
    assert 0.03 < ((ratio < 0.45) | (ratio > 2.2)).mean() < 0.12
    assert final[Bucket(384, 640)] == max(final.values())  # 2:3 portrait is the most common bucket


def test_max_steps_visits_every_bucket_shape(cfg, assignment):
    """One epoch is the only span sure to hold every bucket (random bucket order), so max_steps must cover it."""
    from tasks.cache.chunks import plan_chunks
    from tasks.cache.reader import ChunkReader

    train, final = cfg.train, assignment.final_counts()
    b, a = train.batch_size, train.grad_accum
    micro = sum(n // b for n in final.values())  # drop_last: full batches per bucket, one bucket a batch
    needed = math.ceil(micro / a)
    assert needed <= train.max_steps <= needed + 1, (micro, needed)  # covers the epoch, and not much more
    assert train.max_steps * a * b / 95 < 4 * 60  # < 4 min of steady training at ~95 samples/s on an H100

    # The reader's own plan of epoch 0 over the cache's own chunk layout: every bucket within max_steps windows.
    order = np.lexsort((assignment.ids, assignment.bucket_h, assignment.bucket_w))
    plans = plan_chunks(assignment.ids[order], assignment.bucket_w[order], assignment.bucket_h[order], channels=4,
                        downscale=8, store_std=cfg.cache.store_std, chunk_bytes=cfg.cache.chunk_target_mb * 1e6,
                        row_group_bytes=cfg.cache.row_group_mb * 1e6)
    chunks = []
    for p in plans:
        rows = p.stop - p.start
        groups = [p.row_group_rows] * (rows // p.row_group_rows) + ([rows % p.row_group_rows] if rows % p.row_group_rows else [])
        chunks.append(SimpleNamespace(bucket=f"{p.bucket[0]}x{p.bucket[1]}", rows=rows, row_groups=groups, path=p.path))
    reader = ChunkReader(SimpleNamespace(chunks=chunks, fingerprint="plan"), None, batch_size=b, seed=train.seed,
                         shuffle_buffer=train.shuffle_buffer)
    assert reader.steps_per_epoch() == micro
    batches = reader._global_batches(0)
    seen = {reader._units[int(batch[0]) >> 32].bucket for batch in batches[: train.max_steps * a]}
    assert seen == {(bk.width, bk.height) for bk in final}


def test_default_options_still_plan_todays_sizes():
    plan = planned_sizes(300, 0, max_side=768)
    assert [(p["id"], p["width"], p["height"], p["role"]) for p in plan[:6]] == [
        (1050, 303, 454, ""), (1071, 446, 334, "gif"), (1075, 759, 569, ""), (1104, 323, 461, "webp"),
        (1105, 607, 405, ""), (1137, 403, 604, "")]
    assert [(p["id"], p["width"], p["height"]) for p in plan if p["role"] in ("tall", "wide", "comic")] == [
        (3401, 537, 768), (3437, 255, 768), (5155, 267, 768), (5694, 768, 235), (6381, 537, 768), (6487, 768, 267),
        (6735, 275, 768)]
    assert planned_sizes(300, 0, max_side=768, aspect="classic") == plan
    demo = load_config("demo")
    assert demo.ingest.embedded.aspect == "classic"
    # the default stays out of the ingest fingerprint: outputs made before the option keep theirs
    assert demo.ingest.fingerprint_dict()["embedded"] == {"posts": 300, "seed": 0, "max_side": 768, "near_duplicates": 0.08}
    assert load_config("demo", ["ingest.embedded.aspect=danbooru"]).ingest.fingerprint_dict()["embedded"]["aspect"] \
        == "danbooru"


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for name in ("posts.jsonl", "tags.json", "truth.json", MARKER):
        h.update((root / name).read_bytes())
    for f in sorted((root / "images").iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("aspect", ["classic", "danbooru"])
def test_worker_processes_write_the_same_bytes_and_the_plan_matches(tmp_path, aspect):
    serial = generate_minibooru(tmp_path / "serial", 40, 3, max_side=160, aspect=aspect, workers=1)
    pooled = generate_minibooru(tmp_path / "pooled", 40, 3, max_side=160, aspect=aspect, workers=2)
    assert _digest(serial.root) == _digest(pooled.root)
    assert serial.aspect == aspect
    sizes = [(p["id"], p["image_width"], p["image_height"]) for p in serial.load_posts()]
    assert sizes == [(p["id"], p["width"], p["height"]) for p in planned_sizes(40, 3, max_side=160, aspect=aspect)]


def test_the_aspect_is_part_of_the_generators_cache_key(tmp_path):
    classic = generate_minibooru(tmp_path, 12, 1, max_side=96)
    meta = json.loads((tmp_path / MARKER).read_text())
    assert "aspect" not in meta  # the classic marker is byte-identical to the one before the option
    before = _digest(tmp_path)
    danbooru = generate_minibooru(tmp_path, 12, 1, max_side=96, aspect="danbooru")  # regenerates
    assert json.loads((tmp_path / MARKER).read_text())["aspect"] == "danbooru" and danbooru.aspect == "danbooru"
    assert _digest(tmp_path) != before
    mtime = (tmp_path / MARKER).stat().st_mtime_ns
    generate_minibooru(tmp_path, 12, 1, max_side=96, aspect="danbooru")  # reused
    assert (tmp_path / MARKER).stat().st_mtime_ns == mtime
    assert _digest(generate_minibooru(tmp_path, 12, 1, max_side=96).root) == before == _digest(classic.root)
    with pytest.raises(ValueError, match="aspect"):
        generate_minibooru(tmp_path / "x", 12, 1, max_side=96, aspect="square")


def test_the_ingest_stage_generates_the_configured_aspect(tmp_path, monkeypatch, cfg):
    import minibooru

    from tasks.ingest import embedded

    seen: dict = {}

    def fake(folder, n_posts, seed, **kwargs):
        seen.update(kwargs)
        return SimpleNamespace(root=folder)

    monkeypatch.setattr(minibooru, "generate_minibooru", fake)
    embedded.ensure_minibooru(tmp_path, cfg.ingest.embedded)
    assert seen.get("aspect") == "danbooru"
