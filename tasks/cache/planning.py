"""What the cache stage will write, before any image is read: the samples table and its chunk plans.

Shared by the stage's build (one process, or the merge of a sharded run) and its shards (tasks/cache/shards.py),
which must agree on every plan: both call `plan_samples`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_contracts.errors import ContractError, StageError
from pipeline_config.cache import CacheConfig
from pipeline_config.schema import PipelineConfig
from tasks.cache.captions import TagTokenizer
from tasks.cache.chunks import ChunkPlan, plan_chunks
from tasks.cache.inputs import load_samples
from tasks.cache.reuse import plan_reuse
from tasks.common.stage import StageContext
from tasks.models.identity import files_identity
from tasks.models.sources import ModelSource, resolve_model_source
from tasks.models.tokenizer import (
    builtin_tokenizer_dir,
    load_tokenizer,
    tokenizer_identity,
)


def vae_identity(source: ModelSource, cache_dir: Path) -> str:
    """sha256 of what defines the VAE weights: the checkpoint file, or a diffusers folder's vae/ files."""
    if source.kind == "diffusers":
        files = [p for p in source.weight_files if p.parent.name == "vae"]
        if files:
            return files_identity([(f"vae/{p.name}", p) for p in files], cache_dir)
    return source.identity


def model_identity(cfg: PipelineConfig) -> tuple[ModelSource, str, str]:
    """(source, VAE identity, tokenizer identity) of `cache.model` (builds the tiny builtin on first use)."""
    cache_dir = Path(cfg.runtime.cache_dir)
    source = resolve_model_source(cfg.cache.model, cache_dir)
    tok_dir = source.tokenizer_dir or builtin_tokenizer_dir(cache_dir)
    return source, vae_identity(source, cache_dir), tokenizer_identity(tok_dir)


def fingerprint_extra(cfg: PipelineConfig) -> dict:
    """What the fingerprint needs beyond the config section: the identities of the VAE and tokenizer."""
    _, vae_id, tok_id = model_identity(cfg)
    return {"vae_identity": vae_id, "tokenizer_identity": tok_id}


def vae_shape(source: ModelSource) -> tuple[int, int, float]:
    """(latent channels, downscale, scaling factor) from the VAE config, without loading weights."""
    vae_cfg = json.loads((source.config_dir / "vae" / "config.json").read_text())
    channels = int(vae_cfg.get("latent_channels", 4))
    downscale = 2 ** (len(vae_cfg.get("block_out_channels", [0, 0, 0, 0])) - 1)
    return channels, downscale, float(vae_cfg.get("scaling_factor") or 0.18215)


@dataclass
class Planned:
    samples: pa.Table  # sorted by bucket then id; image paths pool-relative (tasks.cache.inputs.localize)
    rejects: list[dict]  # samples missing from an upstream output
    plans: list[ChunkPlan]
    channels: int
    downscale: int
    scaling: float
    vae_id: str
    tok_id: str
    reused: dict = field(default_factory=dict)  # {"rows", "from"}: latents an earlier output lends (reuse.py)


def plan_samples(ctx: StageContext) -> Planned:
    """Join the upstream outputs into samples (captions tokenized), mark those whose latents an earlier output
    holds, and cut them into chunk plans."""
    cfg = ctx.section
    cache_dir = Path(ctx.cfg.runtime.cache_dir)
    source, vae_id, tok_id = model_identity(ctx.cfg)
    tokenizer = load_tokenizer(source.tokenizer_dir, cache_dir=cache_dir)
    samples, rejects = load_samples(ctx.store, ctx.upstream, cfg, TagTokenizer(tokenizer), fetch=False)
    if samples.num_rows == 0:
        raise StageError("cache: no sample has a row in every upstream output (bucket, ingest, tag, quality); "
                         "check the upstream stages' rejects")
    channels, downscale, scaling = vae_shape(source)
    bw, bh = samples.column("bucket_w").to_numpy(), samples.column("bucket_h").to_numpy()
    if np.any(bw % downscale) or np.any(bh % downscale):
        raise ContractError(f"bucket sizes must be multiples of the VAE downscale {downscale}; "
                            f"found e.g. {int(bw[np.argmax(bw % downscale)])}x{int(bh[np.argmax(bh % downscale)])}")
    samples, reused = plan_reuse(ctx, samples, vae_id)
    return Planned(samples, rejects, chunk_plans(samples, cfg, channels, downscale), channels, downscale, scaling,
                   vae_id, tok_id, reused)


def chunk_plans(samples: pa.Table, cfg: CacheConfig, channels: int, downscale: int) -> list[ChunkPlan]:
    """Chunks of about cache.chunk_target_mb per bucket, in the samples' order (bucket, then id)."""
    return plan_chunks(samples.column("id").to_numpy(), samples.column("bucket_w").to_numpy(),
                       samples.column("bucket_h").to_numpy(), channels=channels, downscale=downscale,
                       store_std=cfg.store_std, chunk_bytes=cfg.chunk_target_mb * 1e6,
                       row_group_bytes=cfg.row_group_mb * 1e6)
