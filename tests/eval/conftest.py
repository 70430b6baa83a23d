"""The eval tests run the real pipeline on a small mini-booru: ingest (embedded HTTP server) -> tag -> quality
-> bucket -> cache -> train, every stage through `run_stage` and the real store, then eval on top.

Two settings make the tiny random SD1.5 able to learn characters in a CPU-minute (both are config or
checkpoint choices, no code path differs from a real run):
* the tiny VAE's scaling factor is calibrated like SD's 0.18215 was: 1 / std of its latents on the training
  images, so the UNet sees unit-variance latents (with 0.18215 they have std ~0.05 and the characters differ
  by ~0.01: noise swamps them);
* cache.store_std = false: the random VAE's posterior std is ~4x its mean spread, so sampling x0 from the
  posterior (as for a real VAE, whose std is tiny) would bury the images in noise.
"""
from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path

import pytest
import torch

CHARACTERS = ["kurosaki_ren_(starlit_stage)", "lila_(neon_district_77)", "momoi_hana_(hanasaki_gakuen)"]


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """2 shared cores: one intra-op thread avoids oversubscription (and keeps results thread-count independent)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def eval_registered():
    """Until the lead registers the eval contract in data_contracts/registry.py, add it for these tests."""
    import data_contracts.registry as reg
    from data_contracts.eval import EvalManifest

    original = reg._manifest_classes
    if "eval" in original():
        yield
        return
    reg._manifest_classes = lambda: {**original(), "eval": EvalManifest}
    yield
    reg._manifest_classes = original


def pipeline_config_cls():
    """PipelineConfig, with an `eval` section added when schema.py does not have one yet."""
    from pipeline_config.eval import EvalConfig
    from pipeline_config.schema import PipelineConfig

    if "eval" in PipelineConfig.model_fields:
        return PipelineConfig

    class WithEval(PipelineConfig):
        eval: EvalConfig = EvalConfig()

    return WithEval


def make_config(root: Path, **sections):
    tree = {
        "data_root": str(root / "data"),
        "runtime": {"device": "cpu", "cache_dir": str(root / "cache")},
        "ingest": {"embedded": {"posts": 300, "seed": 0, "max_side": 128},
                   "queries": [{"tags": c} for c in CHARACTERS],
                   "filters": {"min_width": 0, "min_height": 0}, "min_per_character": 0},
        "dedup": {"enabled": False},  # 128 px pictures from few templates: the probes need every post
        "tag": {"batch_size": 16},
        "quality": {"min_posts_per_year": 1},
        "bucket": {"resolution": 64, "step": 32, "min_side": 32, "max_side": 128, "min_image_side": 0},
        "cache": {"store_std": False},
        "train": {"batch_size": 16, "grad_accum": 1, "max_steps": 150, "lr": 1e-3, "warmup": 0.0,
                  "optimizer": "adamw", "mixed_precision": "no", "caption_dropout": 0.1, "checkpoint_every": 10000,
                  "validation": {"fraction": 0.0}, "sampling": {"prompts": []},
                  "logging": {"every": 20, "tensorboard": False}, "export_diffusers": False,
                  "launcher": "inprocess", "shuffle_buffer": 64, "prefetch": 2, "export_dtype": "fp32"},
        "eval": {"kinds": ["character", "artist"], "min_samples": 8, "max_concepts": 3, "images_per_concept": 6,
                 "steps": 16, "width": 64, "height": 64, "probe_space": "latent", "reference_images": 12,
                 "control_prompts": ["1girl, solo", "no humans, scenery"], "batch_size": 6},
    }
    for name, upd in sections.items():
        tree[name] = {**tree.get(name, {}), **upd}
    return pipeline_config_cls().model_validate(tree)


def run(stage: str, cfg, store, **kw):
    from tasks.common.stage import run_stage

    return run_stage(importlib.import_module(f"tasks.{stage}.stage").SPEC, cfg, store, **kw)


def calibrated_tiny(cfg, store, out: Path) -> Path:
    """Export builtin:tiny-sd15 with its VAE scaling factor = 1 / std of its latents on the ingested images."""
    import pyarrow.parquet as pq
    from PIL import Image

    from data_contracts.ingest import IngestManifest
    from tasks.eval.concepts import posts_files
    from tasks.eval.probe import encode_images
    from tasks.models.single_file import export_single_file
    from tasks.sample.main import load_for_sampling

    ingest = store.read_manifest(IngestManifest)
    paths = pq.read_table(store.path(ingest, posts_files(ingest)[0]), columns=["image_path"])["image_path"].to_pylist()
    model = load_for_sampling("builtin:tiny-sd15", cache_dir=Path(cfg.runtime.cache_dir), device="cpu")
    vae = model.components.vae
    ims = [Image.open(store.pool_dir() / p).convert("RGB") for p in paths[:32]]
    vae.register_to_config(scaling_factor=1.0)
    lat = encode_images(vae, ims, 64, 64)
    vae.register_to_config(scaling_factor=float(1.0 / lat.std()))
    c = model.components
    export_single_file(c.unet, c.vae, c.text_encoder, out, dtype=torch.float32)
    return out


def _build_chain(root: Path) -> Path:
    """ingest..cache under root (data, local, cache) on the calibrated tiny model; returns the model file."""
    from data_contracts.store import ArtifactStore

    cfg = make_config(root)
    store = ArtifactStore(cfg.data_root, local_cache=root / "local")
    run("ingest", cfg, store)
    model = calibrated_tiny(cfg, store, root / "tiny-calibrated.safetensors")
    cfg = make_config(root, cache={"model": str(model)}, train={"model": str(model)})
    for stage in ("dedup", "tag", "quality", "bucket", "cache"):
        run(stage, cfg, store)
    return model


@pytest.fixture(scope="session")
def cached_chain(tmp_path_factory, eval_registered):
    """(root, store, cfg) after ingest..cache on the calibrated tiny model: what every training here reads.

    Built once per test run. Under xdist the first worker that needs it builds it in the run's common temp
    folder (under a file lock; another worker waits for it) and each worker gets its own copy of the data,
    local cache and model cache (its tests write train and eval outputs into the chain); the calibrated model
    file stays where it was built, read-only (its path is part of the cache and train fingerprints)."""
    from data_contracts.store import ArtifactStore

    root = tmp_path_factory.mktemp("eval-chain")
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        model = _build_chain(root)
    else:
        from filelock import FileLock

        shared = tmp_path_factory.getbasetemp().parent / "eval-chain-shared"  # this run's, every worker's
        with FileLock(f"{shared}.lock"):
            if not (shared / "complete").is_file():
                shutil.rmtree(shared, ignore_errors=True)  # a worker that failed half-way
                _build_chain(shared)
                (shared / "complete").touch()
        for sub in ("data", "local", "cache"):
            if (shared / sub).exists():
                shutil.copytree(shared / sub, root / sub)
        model = shared / "tiny-calibrated.safetensors"
    cfg = make_config(root, cache={"model": str(model)}, train={"model": str(model)})
    store = ArtifactStore(cfg.data_root, local_cache=root / "local")
    assert store.current("cache") is not None
    return root, store, cfg


@pytest.fixture(scope="session")
def trained(cached_chain):
    """(root, store, cfg) after ingest..train on the calibrated tiny model."""
    root, store, cfg = cached_chain
    run("train", cfg, store)
    return root, store, cfg
