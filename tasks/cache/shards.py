"""Cache over a Dask or Ray task runner: one shard per chunk plan, on whichever worker the runner picks.

`plan_shards` joins the upstream outputs once and writes the samples (pool-relative image paths, so any
machine can use them) to `_shard-samples.parquet` in the work folder; each shard is one chunk plan (a part of
one bucket), largest first. `run_shard` re-derives the plans from those samples (it refuses a shard planned on
other samples), brings the chunk's images into its machine's pool copy, encodes them on the worker's device
with a VAE loaded once per worker process, writes the chunk and journals it in `_journal-s<k>.jsonl`; on
object storage both are published for the merge (chunk first, under a content-addressed name; journal last);
the merge reads the journals and commits the published chunks by a copy on the store, never downloading them. Under Ray each shard task gets
one GPU (`runtime.device: cuda`); under Dask give each worker one GPU (dask-cuda's LocalCUDACluster does).
The merge (the stage's build) fetches every journal and writes any chunk no worker did. Under the thread
runner the stage is one task: this process plus one process per further local GPU (pipeline.run_sharded).
"""
from __future__ import annotations

import dataclasses
import os
import socket
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from data_contracts.errors import StageError
from data_contracts.fingerprint import sha256_file
from tasks.cache.chunks import ChunkPlan, is_done, read_journal
from tasks.cache.encode import LatentEncoder, resolve_device
from tasks.cache.inputs import localize
from tasks.cache.pipeline import ChunkEncoder, LoopStats, bucket_sizes, load_vae
from tasks.cache.planning import chunk_plans, model_identity, plan_samples, vae_shape
from tasks.common.journal import read_records
from tasks.common.process_cache import ProcessCache
from tasks.common.stage import StageContext

SAMPLES = "_shard-samples.parquet"


def _journal_rel(k: int) -> str:
    return f"_journal-s{k:05d}.jsonl"


def _entry(ctx: StageContext, k: int, plan_path: str, key: str, just_written: bool = False) -> dict | None:
    """Shard k's journal entry when its chunk is written (both fetched when another machine wrote them;
    fetched again when the local copies are a killed run's leftovers that another machine has finished).
    just_written: this process has just written and journalled the chunk, so its size is proof enough."""
    for refresh in (False, True) if not ctx.store.is_local else (False,):
        entry = _read_entry(ctx, k, plan_path, key, refresh, just_written)
        if entry is not None:
            return entry
    return None


def published_rel(entry: dict) -> str:
    """The name a chunk is published under: content-addressed, so the bytes behind a name are the bytes its
    journal's sha256 describes, whichever attempt (a retry, a duplicate on another machine) uploaded last."""
    return f"{entry['path']}.{entry['sha256'][:16]}"


def _read_entry(ctx: StageContext, k: int, plan_path: str, key: str, refresh: bool,
                just_written: bool = False) -> dict | None:
    """The journal entry of shard k's chunk when its bytes are here or on the store. An entry accepted from
    the store carries `published` (the published name): that chunk is never downloaded (the commit copies it
    on the store; the decoded-latents sheet reads a few rows of it in place)."""
    journal = ctx.store.work_get(ctx.stage, ctx.fingerprint, _journal_rel(k), refresh=refresh)
    if journal is None:
        return None
    for entry in read_records(journal):  # a line cut by a kill ends the read
        if entry.get("path") != plan_path or entry.get("key") != key:
            continue
        chunk = ctx.work / plan_path
        if entry["rows"] == 0:
            return entry
        # On a shared local root every journal line follows its own chunk's rename: the size is enough (as in
        # one process). On object storage the journal may be another machine's and a local file a killed
        # attempt's leftover of the same size: it counts only with the journalled sha256.
        if chunk.is_file() and chunk.stat().st_size == entry["bytes"] and \
                (ctx.store.is_local or just_written or sha256_file(str(chunk)) == entry["sha256"]):
            return entry
        if ctx.store.work_published_size(ctx.stage, ctx.fingerprint, published_rel(entry)) == entry["bytes"]:
            chunk.unlink(missing_ok=True)  # a killed attempt's leftover here: the journalled bytes are on the store
            return {**entry, "published": published_rel(entry)}
    return None


def plan_shards(ctx: StageContext) -> list[dict[str, Any]]:
    """The chunks still to write, one shard each, largest first (none unless the stage is sharded over a
    cluster runner's workers: StageContext.sharded)."""
    if not ctx.sharded:
        return []
    planned = plan_samples(ctx)
    tmp = ctx.work / f".{SAMPLES}.tmp"
    pq.write_table(planned.samples, tmp)
    os.replace(tmp, ctx.work / SAMPLES)  # a kill mid-write leaves no half file under the name shards read
    ctx.store.work_put(ctx.stage, ctx.fingerprint, SAMPLES)
    done = read_journal(ctx.work)
    shards = [{"index": k, "path": p.path, "key": p.key, "rows": p.stop - p.start}
              for k, p in enumerate(planned.plans)
              if not is_done(p, done) and _entry(ctx, k, p.path, p.key) is None]
    ctx.log.info("cache: %d of %d chunks to write as shards", len(shards), len(planned.plans))
    return sorted(shards, key=lambda s: -s["rows"])


# One worker process runs many shards of one stage run: read the samples and load the VAE once per process.
_STATE: ProcessCache[tuple[pa.Table, list[ChunkPlan], LatentEncoder]] = ProcessCache("cache shard samples + VAE")


def _worker_state(ctx: StageContext) -> tuple[pa.Table, list[ChunkPlan], LatentEncoder]:
    runtime = ctx.cfg.runtime
    return _STATE.get((ctx.store.root_url, ctx.fingerprint, runtime.device), lambda: _load_state(ctx))


def _load_state(ctx: StageContext) -> tuple[pa.Table, list[ChunkPlan], LatentEncoder]:
    cfg, runtime = ctx.section, ctx.cfg.runtime
    path = ctx.store.work_get(ctx.stage, ctx.fingerprint, SAMPLES)
    if path is None:
        raise StageError(f"cache: the shards' samples file {SAMPLES} is missing; rerun `fm run cache`")
    samples = pq.read_table(path)
    channels, downscale, _ = vae_shape(model_identity(ctx.cfg)[0])
    plans = chunk_plans(samples, cfg, channels, downscale)
    device = resolve_device(runtime.device)
    encoder = LatentEncoder(load_vae(cfg.model, Path(runtime.cache_dir)), device, cfg.batch_size,
                            compile=cfg.compile)
    return samples, plans, encoder


def _summary(k: int, entry: dict, started: float, stats: LoopStats | None, device: str) -> dict[str, Any]:
    return {"index": k, "path": entry["path"], "rows": entry["rows"], "rejects": len(entry["rejects"]),
            "images": stats.images if stats else 0, "started": started, "finished": time.time(),
            "device": device, "worker": f"{socket.gethostname()}:{os.getpid()}"}


def run_shard(ctx: StageContext, shard: dict[str, Any]) -> dict[str, Any]:
    """Encode and write one chunk (idempotent: a written chunk returns its summary at once)."""
    started = time.time()
    k = int(shard["index"])
    entry = _entry(ctx, k, shard["path"], shard["key"])
    if entry is not None:
        _publish(ctx, k, entry)  # a kill may have come between the journal line and its upload
        return _summary(k, entry, started, None, "")
    samples, plans, encoder = _worker_state(ctx)
    if k >= len(plans) or plans[k].key != shard["key"] or plans[k].path != shard["path"]:
        raise StageError(f"cache shard {k} ({shard['path']}) does not match the samples it was planned on; "
                         "rerun `fm run cache`")
    cfg, runtime = ctx.section, ctx.cfg.runtime
    plan = plans[k]
    part = localize(ctx.store, samples.slice(plan.start, plan.stop - plan.start))
    loop = ChunkEncoder.from_section(cfg, encoder, encoder.device, threads=runtime.max_workers, work=ctx.work,
                                     journal=ctx.work / _journal_rel(k))
    stats = loop.encode(part, [dataclasses.replace(plan, start=0, stop=part.num_rows)],
                        bucket_rows=bucket_sizes(plans))
    entry = _entry(ctx, k, plan.path, plan.key, just_written=True)  # write_chunk hashed it: no second read
    if entry is None:
        raise StageError(f"cache shard {k}: {plan.path} was not journalled")
    _publish(ctx, k, entry)
    ctx.log.info("cache: shard %d: %s, %d rows, %d rejected", k, plan.path, entry["rows"], len(entry["rejects"]))
    return _summary(k, entry, started, stats, str(encoder.device))


def _publish(ctx: StageContext, k: int, entry: dict) -> None:
    if entry["rows"] and "published" not in entry and \
            ctx.store.work_published_size(ctx.stage, ctx.fingerprint, published_rel(entry)) != entry["bytes"]:
        ctx.store.work_put(ctx.stage, ctx.fingerprint, entry["path"], as_rel=published_rel(entry))
    ctx.store.work_put(ctx.stage, ctx.fingerprint, _journal_rel(k))  # the journal last: it marks the chunk done


def published_entries(ctx: StageContext, plans: list[ChunkPlan]) -> dict[str, dict]:
    """path -> journal entry of every chunk a shard has written, here or on another machine (journals
    are fetched; chunks stay where they are: in this work folder or published on the store)."""
    found: dict[str, dict] = {}
    for k, plan in enumerate(plans):
        entry = _entry(ctx, k, plan.path, plan.key)
        if entry is not None:
            found[plan.path] = entry
    return found


def merge_stats(results: list[dict[str, Any]], here: LoopStats) -> LoopStats:
    """This run's figures: the shards' images over the wall time from the first shard's start to the last
    one's end (workers run at once), plus what the merge wrote itself."""
    ran = [r for r in results if r.get("images")]
    if not ran:
        return here
    total = LoopStats(images=sum(r["images"] for r in ran), chunks=len(ran),
                      seconds=max(r["finished"] for r in ran) - min(r["started"] for r in ran))
    total.merge(here)
    return total


def remove_inputs(ctx: StageContext) -> None:
    """The samples file is the shards' input, not part of the output; a VAE this process kept for
    shards run here is let go."""
    (ctx.work / SAMPLES).unlink(missing_ok=True)
    _STATE.clear()
