"""The cache stage: bucketed samples -> VAE latents + per-tag CLIP token ids in Parquet chunks.

Output folder:
    chunks/bucket=<w>x<h>/part-<n>.parquet   CHUNK_SCHEMA rows, sorted by id within a chunk
    rejects.parquet                          id, reason, detail (missing upstream rows, bad images)
    _journal-<rank>.jsonl                    one line per finished chunk (resume bookkeeping; _journal-s<k>
                                             for shard k under a Dask/Ray runner, tasks/cache/shards.py)
    report.json, manifest.json

After an ingest update most samples are unchanged: their latents are read from the earlier cache output of the same
VAE and encoding instead of encoded again (tasks/cache/reuse.py; stats `reused_latents`, `latent_identity`).

The VAE and tokenizer identities (sha256 of the weights / vocabulary files) belong in the fingerprint:
`fingerprint_extra(cfg)` returns them for the stage runner to mix into the config digest, so a changed
VAE file under the same `cache.model` path re-caches.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from data_contracts.bucket import BUCKETS_SCHEMA
from data_contracts.cache import ChunkInfo
from data_contracts.errors import StageError
from data_contracts.manifest import FileEntry
from data_contracts.ingest import POSTS_SCHEMA
from data_contracts.tables import REJECTS_SCHEMA, write_table
from tasks.cache import shards
from tasks.cache.chunks import clean_temp, is_done, read_journal
from tasks.cache.encode import resolve_device
from tasks.cache.inputs import localize
from tasks.cache.pipeline import ChunkEncoder, LoopStats, bucket_sizes, decode_backend, load_vae, run_sharded
from tasks.cache.planning import fingerprint_extra, plan_samples
from tasks.cache.reuse import IDENTITY_KEY, latent_identity
from tasks.cache.visuals import (
    decode_check,
    make_decoded_sheet,
    read_chunk_sample,
    vae_decoder,
)
from tasks.common.pictures import draw_pictures
from tasks.common.stage import StageContext, StageReport, StageResult, StageSpec
from tasks.common.upstream import read_upstream

CODE_VERSION = "2"  # 2: decoded-latent sheet + PSNR in the report
REJECTS_FILE = "rejects.parquet"


def _report(chunks: list[ChunkInfo], rejects: list[dict], stats: dict) -> StageReport:
    per_bucket: dict[str, dict] = {}
    for c in chunks:
        row = per_bucket.setdefault(c.bucket, {"bucket": c.bucket, "rows": 0, "chunks": 0, "mb": 0.0})
        row["rows"] += c.rows
        row["chunks"] += 1
        row["mb"] = round(row["mb"] + c.bytes / 1e6, 2)
    reasons = Counter(r["reason"] for r in rejects)
    lines = [
        f"**{stats['rows']}** samples cached in **{len(chunks)}** chunks "
        f"({stats['bytes'] / 1e6:.1f} MB, {stats['bytes_per_sample'] / 1e3:.1f} kB/sample), "
        f"{len(rejects)} rejected.",
        f"VAE `{stats['vae_identity'][:12]}` on {stats['device']} ({stats['decode']} decode), "
        f"{stats['images_per_s']:.1f} img/s this run.",
    ]
    if stats.get("reused_latents"):
        kept = stats["reused_latents"]
        lines.append(f"{kept['rows']} latents kept from cache output `{kept['from']}` (same VAE and encoding, same "
                     "image and crop): only new and changed images were encoded.")
    return StageReport(
        summary_md="\n\n".join(lines),
        tables={"buckets": sorted(per_bucket.values(), key=lambda r: r["bucket"]),
                "rejects": [{"reason": k, "count": v} for k, v in reasons.most_common()]},
    )


def build(ctx: StageContext) -> StageResult:
    cfg = ctx.section
    runtime = ctx.cfg.runtime
    cache_dir = Path(runtime.cache_dir)
    planned = plan_samples(ctx)
    samples, rejects, plans = planned.samples, planned.rejects, planned.plans
    vae_id, tok_id, scaling = planned.vae_id, planned.tok_id, planned.scaling
    channels, downscale = planned.channels, planned.downscale
    # Chunks the runner's workers wrote (on object storage they may stay on the store: see shards.py)
    elsewhere = shards.published_entries(ctx, plans) if ctx.sharded else {}

    clean_temp(ctx.work)
    done = {**read_journal(ctx.work), **elsewhere}  # the shards' entries as published_entries checked them
    todo = [p for p in plans if not is_done(p, done)]
    device = resolve_device(runtime.device)
    backend = decode_backend(cfg.decode, device)
    gpus = (cfg.gpus or torch.cuda.device_count()) if device.type == "cuda" else 1
    gpus = max(1, min(gpus, torch.cuda.device_count() if device.type == "cuda" else 1, len(todo) or 1))
    ctx.log.info("cache: %d samples, %d chunks planned, %d to do, device %s x%d, %s decode",
                 samples.num_rows, len(plans), len(todo), device, gpus, backend)
    total_rows = sum(p.stop - p.start for p in todo) or 1
    progress = {"rows": 0}

    def on_chunk(plan, entry) -> None:
        progress["rows"] += plan.stop - plan.start
        ctx.progress(progress["rows"] / total_rows, f"cached {plan.path} ({entry['rows']} rows)")

    loop = LoopStats()
    vae = load_vae(cfg.model, cache_dir) if todo else None
    if todo:  # the images of the chunks written here, local (downloaded on object storage)
        samples = localize(ctx.store, samples)
    if todo and gpus > 1:
        loop = run_sharded(samples, todo, gpus=gpus, work=ctx.work, model=cfg.model, cache_dir=cache_dir,
                           backend=backend, batch_size=cfg.batch_size, compile=cfg.compile,
                           store_std=cfg.store_std, threads=runtime.max_workers,
                           compile_min_images=cfg.compile_min_images, vae=vae, on_chunk=on_chunk,
                           bucket_rows=bucket_sizes(plans))
    elif todo:
        encoder = ChunkEncoder.from_section(cfg, vae, device, threads=runtime.max_workers, work=ctx.work,
                                            journal=ctx.work / "_journal-0.jsonl")
        loop = encoder.encode(samples, todo, on_chunk=on_chunk,
                              bucket_rows=bucket_sizes(plans))  # compile choices as in an uninterrupted run

    if ctx.sharded:
        loop = shards.merge_stats(ctx.shard_results, loop)
    shards.remove_inputs(ctx)
    done = {**read_journal(ctx.work), **elsewhere}
    missing = [p.path for p in plans if not is_done(p, done)]
    if missing:
        raise StageError(f"cache: {len(missing)} chunk(s) were not written (e.g. {missing[0]}); rerun to resume")
    chunks: list[ChunkInfo] = []
    chunk_ids: list[np.ndarray] = []  # the ids each chunk holds: its plan's samples less its rejects
    sample_ids = samples.column("id").to_numpy()
    for plan in plans:
        entry = done[plan.path]
        rejects.extend(entry["rejects"])
        if entry["rows"]:
            chunks.append(ChunkInfo(**{k: entry[k] for k in ChunkInfo.model_fields}))
            chunk_ids.append(np.setdiff1d(sample_ids[plan.start:plan.stop], [r["id"] for r in entry["rejects"]]))
    rows = sum(c.rows for c in chunks)
    if rows == 0:
        reasons = dict(Counter(r["reason"] for r in rejects))
        raise StageError(f"cache: every sample was rejected ({reasons}); check the images and cache.model")
    if rows + sum(len(done[p.path]["rejects"]) for p in plans) != samples.num_rows:
        raise StageError("cache: chunk rows + image rejects do not add up to the planned samples; "
                         "rerun with --force")
    write_table(pa.Table.from_pylist(rejects, REJECTS_SCHEMA), ctx.work / REJECTS_FILE, REJECTS_SCHEMA)

    nbytes = sum(c.bytes for c in chunks)
    bucket_counts: dict[str, int] = {}
    for c in chunks:
        bucket_counts[c.bucket] = bucket_counts.get(c.bucket, 0) + c.rows
    stats = {
        "rows": rows, "bytes": nbytes, "bytes_per_sample": nbytes / max(rows, 1),
        "device": str(device), "gpus": gpus, "decode": backend, "vae_identity": vae_id,
        "images_this_run": loop.images, "seconds_this_run": round(loop.seconds, 2),
        "images_per_s": loop.images / loop.seconds if loop.seconds else 0.0,
        "encode_wait_s": round(loop.encode_wait_s, 2), "chunks_resumed": len(plans) - len(todo),
        "reject_reasons": dict(Counter(r["reason"] for r in rejects)),
        IDENTITY_KEY: latent_identity(ctx, vae_id),
    }
    if planned.reused:
        stats["reused_latents"] = planned.reused
    report = _report(chunks, rejects, stats)
    published = {done[c.path]["published"]: FileEntry(path=c.path, size=c.bytes, sha256=c.sha256)
                 for c in chunks if "published" in done[c.path]}  # only on the store (another machine's)
    images, note = draw_pictures(ctx, {"decoded latents": lambda: _decoded_sheet(ctx, chunks, chunk_ids, published,
                                                                                  scaling, channels, downscale,
                                                                                  stats)})
    report.images.update(images)
    report.summary_md += note
    return StageResult(
        row_counts={"chunks": rows, "rejects": len(rejects)},
        stats=stats,
        manifest_fields={
            "vae_identity": vae_id, "tokenizer_identity": tok_id, "scaling_factor": scaling,
            "latent_dtype": "float16", "stores_std": cfg.store_std, "latent_channels": channels,
            "latent_downscale": downscale, "model": cfg.model, "chunks": chunks, "bucket_counts": bucket_counts,
        },
        report=report,
        published=published,
    )


def _decoded_sheet(ctx: StageContext, chunks: list[ChunkInfo], chunk_ids: list[np.ndarray],
                   published: dict[str, FileEntry], scaling: float, channels: int, downscale: int,
                   stats: dict) -> dict[str, str]:
    """Cached latents decoded through the same VAE beside their cropped sources, with the PSNR in stats:
    the visual proof that the cache holds what training will see. Chunks only on the store (published by
    other machines) are read in place, and only the few row groups holding the chosen rows."""
    work_url = ctx.store.work_url(ctx.stage, ctx.fingerprint)
    where = {e.path: src for src, e in published.items()}
    rows = read_chunk_sample([f"{work_url}/{where[c.path]}" if c.path in where else str(ctx.work / c.path)
                              for c in chunks], seed=ctx.cfg.seed, max_items=12,
                             filesystems=[ctx.store.fs if c.path in where else None for c in chunks],
                             ids_per_file=chunk_ids)
    ids = rows.column("id").to_pylist()
    buckets = read_upstream(ctx.store, ctx.upstream["bucket"], "buckets", BUCKETS_SCHEMA, None)
    posts = read_upstream(ctx.store, ctx.upstream["ingest"], "posts", POSTS_SCHEMA, ["id", "image_path"])
    posts = posts.filter(pc.is_in(posts.column("id"), pa.array(ids, pa.int64())))
    pool = ctx.store.pool_fetch(posts.column("image_path").to_pylist())
    # On the stage's device: 12 full-size fp32 decodes took 35 s on a GPU machine's CPU (the gpu-check run)
    device = resolve_device(ctx.cfg.runtime.device)
    vae = load_vae(ctx.section.model, Path(ctx.cfg.runtime.cache_dir)).to(device)
    try:
        check = decode_check(rows, buckets, posts, pool, vae_decoder(vae), scaling_factor=scaling,
                             latent_channels=channels, latent_downscale=downscale, seed=ctx.cfg.seed)
    finally:
        del vae
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the train stage may follow in this process
    stats.update(check.stats())
    return make_decoded_sheet(check, ctx.work)


SPEC = StageSpec(name="cache", upstream=("ingest", "tag", "quality", "bucket"), code_version=CODE_VERSION,
                 gpu=True, build=build, resumable=True, fingerprint_extra=fingerprint_extra,
                 plan_shards=shards.plan_shards, run_shard=shards.run_shard)
