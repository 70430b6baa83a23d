"""Fixtures for the train tests: the tiny SD1.5 stand-in and a small cache output built with the contract.

The cache is written through the real store (real Parquet with CHUNK_SCHEMA, a real CacheManifest) and
read by the real ChunkReader. Latents are a learnable toy distribution: each "character" has its own
mean pattern, so the UNet has something to fit.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data_contracts.cache import CHUNK_SCHEMA, SEGMENTS, CacheManifest, ChunkInfo
from data_contracts.fingerprint import digest, sha256_file
from data_contracts.store import ArtifactStore
from tasks.captions import render_tag


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """2 shared cores: one intra-op thread is ~10x faster than oversubscribing, and makes CPU results
    independent of the thread count (the resume test compares a subprocess with this process)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CHARACTERS = ["hatsune_miku", "frieren_(sousou_no_frieren)", "asuka_langley_soryu", "iseri_nina"]
GENERAL = ["long_hair", "smile", "open_mouth", "blue_eyes", "skirt", "school_uniform", "outdoors", "sky",
           "holding", "standing", "looking_at_viewer", "blush"]


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train-model-cache")


@pytest.fixture(scope="session")
def tokenizer(model_cache):
    from tasks.models.tokenizer import load_tokenizer

    return load_tokenizer(None, cache_dir=model_cache)


def unescape(text: str) -> str:
    return text.replace("\\(", "(").replace("\\)", ")")


def sample_rows(n: int, buckets: list[tuple[int, int]], tokenizer, seed: int = 0) -> list[dict]:
    from tasks.models.tokenizer import tokenize_text

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        w, h = buckets[i % len(buckets)]
        char = i % len(CHARACTERS)
        shape = (4, h // 8, w // 8)
        base = np.sin(np.arange(np.prod(shape)).reshape(shape) * (char + 1) * 0.7) * 2.0
        mean = (base + 0.1 * rng.standard_normal(shape)).astype(np.float16)
        std = np.full(shape, 0.05, dtype=np.float16)
        general = list(rng.choice(GENERAL, size=4, replace=False))
        tags = {"count": ["1girl"], "character": [CHARACTERS[char]], "series": ["vocaloid"], "general": general,
                "artist": [f"artist_{char}"], "quality": ["good score" if i % 2 else "masterpiece"]}
        row = {"id": 1000 + i, "bucket_w": w, "bucket_h": h, "flip": False, "latent_mean": mean.tobytes(),
               "latent_std": std.tobytes(), "quality_label": tags["quality"][0], "tag_weight": 1.0 + 0.1 * (i % 3)}
        for seg in SEGMENTS:
            rendered = [render_tag(t) if seg != "quality" else t for t in tags[seg]]
            row[f"tags_{seg}"] = rendered
            # as the cache contract says: ids of the tag the prompt parser sees (escapes removed), alone and
            # followed by its ", " separator
            row[f"tokens_{seg}"] = [tokenize_text(tokenizer, unescape(t)) for t in rendered]
            row[f"tokens_sep_{seg}"] = [tokenize_text(tokenizer, unescape(t) + ", ") for t in rendered]
        rows.append(row)
    return rows


def commit_cache(store: ArtifactStore, rows: list[dict], *, row_group: int = 4) -> CacheManifest:
    """Write rows as bucket-partitioned chunks and commit a CacheManifest through the store."""
    fp = digest({"ids": [r["id"] for r in rows], "n": len(rows), "b": sorted({(r["bucket_w"], r["bucket_h"]) for r in rows})})
    work = store.begin("cache", fp, resume=False)
    chunks = []
    by_bucket: dict[tuple[int, int], list[dict]] = {}
    for r in rows:
        by_bucket.setdefault((r["bucket_w"], r["bucket_h"]), []).append(r)
    for (w, h), part in sorted(by_bucket.items()):
        rel = f"chunks/bucket={w}x{h}/part-00000.parquet"
        path = work / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(part, schema=CHUNK_SCHEMA)
        pq.write_table(table, path, row_group_size=row_group)
        groups = [min(row_group, len(part) - s) for s in range(0, len(part), row_group)]
        chunks.append(ChunkInfo(path=rel, bucket=f"{w}x{h}", rows=len(part), bytes=path.stat().st_size,
                                sha256=sha256_file(str(path)), row_groups=groups))
    manifest = CacheManifest(stage="cache", contract_version=CacheManifest.CONTRACT_VERSION, fingerprint=fp,
                             config_digest="test", code_version="test", row_counts={"samples": len(rows)},
                             vae_identity="test-vae", tokenizer_identity="test-tok", scaling_factor=0.18215,
                             chunks=chunks,
                             bucket_counts={f"{w}x{h}": len(p) for (w, h), p in by_bucket.items()})
    return store.commit(manifest, work)


@pytest.fixture
def make_cache(tmp_path, tokenizer):
    def make(n: int = 16, buckets=((64, 64),), seed: int = 0, root: Path | None = None):
        store = ArtifactStore(str(root or tmp_path / "data"), local_cache=tmp_path / "local")
        return store, commit_cache(store, sample_rows(n, list(buckets), tokenizer, seed))

    return make


def child_env() -> dict[str, str]:
    """Environment for training subprocesses: one thread each, like this process."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def kill_worker_after(spec, run_file: Path, step: int) -> None:
    """Run `spec` in a training worker process (`python -m tasks.train.worker`) that SIGKILLs itself after
    `step` (the worker registers a kill hook from KILL_ENV), and check that it died that way."""
    import subprocess
    import sys

    from tasks.train.worker import KILL_ENV

    spec.save(run_file)
    proc = subprocess.run([sys.executable, "-m", "tasks.train.worker", str(run_file)],
                          cwd=Path(__file__).resolve().parents[2], env={**child_env(), KILL_ENV: str(step)},
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == -9, proc.stdout[-2000:] + proc.stderr[-2000:]  # SIGKILLed after `step`


def base_train(**over) -> dict:
    """A small, fast CPU training config (JSON form of TrainConfig)."""
    cfg = {
        "model": "builtin:tiny-sd15", "batch_size": 4, "grad_accum": 1, "epochs": 1, "lr": 1e-3, "warmup": 0.0,
        "optimizer": "adamw", "mixed_precision": "no", "caption_dropout": 0.0, "checkpoint_every": 1000,
        "validation": {"fraction": 0.0}, "sampling": {"prompts": []},
        "logging": {"every": 1, "tensorboard": False}, "export_diffusers": False, "launcher": "inprocess",
        "shuffle_buffer": 64, "prefetch": 2,
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    from pipeline_config.train import TrainConfig

    return TrainConfig.model_validate(cfg).model_dump(mode="json")


def run_spec(store: ArtifactStore, manifest: CacheManifest, work: Path, model_cache: Path, **over):
    from tasks.train.loop import RunSpec

    return RunSpec(train=base_train(**over), work=str(work), data_root=store.root_url,
                   local_cache=str(store.local_cache), cache_fingerprint=manifest.fingerprint,
                   model_cache_dir=str(model_cache), device="cpu")


def unet_weights(work: Path) -> dict[str, torch.Tensor]:
    """The fp32 UNet of the last training checkpoint."""
    from safetensors.torch import load_file

    from tasks.train.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(work)
    assert ckpt is not None, f"no checkpoint under {work}"
    return load_file(str(ckpt / "unet.safetensors"))
