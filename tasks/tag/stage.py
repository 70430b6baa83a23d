"""The tag stage: run the WD tagger over every ingested image, merge with the Danbooru tags, weight samples.

Work is split into shards of `tag.shard_size` posts (in id order). `plan_shards` lists the shards not
done yet; `run_shard` tags one (on whichever worker the flow's task runner picks: threads, Dask, Ray, or
in order under run_stage) and journals it in `<work>/journal/` (tags table, rejects table, then a small
JSON that is the "done" mark), published through the store so a merge on another machine sees it. A
killed run resumes at the first unfinished shard. `build` then joins the shards (running any shard that
is still missing), computes the tag-rarity weights over the whole dataset, writes tags.parquet +
rejects.parquet + summary.json + pictures, and only then removes the journal; a kill during that step
redoes only that step. The shards' results do not depend on which worker ran them, so tags.parquet is
the same bytes whatever the runner.

Reuse (an update's later stages): rows of an earlier tag output made by the same tagger (code version, config,
model and label files, backend, device) are kept for the posts whose id, image file (md5) and Danbooru
general/character tags are unchanged since (core.reusable); only the other posts go through the model. The
earlier output is the current one, else the newest one of the same tagger; its upstream ingest output must still
exist. The weights are recomputed over the whole dataset as always.

The same shape as every stage (docs/adding_a_stage.md): the tagging itself and the report's numbers are
plain functions in core.py, the pictures in visuals.py; this module holds the shard bookkeeping and `build`.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_contracts.dedup import DEDUP_SCHEMA
from data_contracts.errors import BooruflowError, ContractError, StageError
from data_contracts.fingerprint import digest
from data_contracts.ingest import IngestManifest
from data_contracts.store import atomic_write_text
from data_contracts.tables import REJECTS_SCHEMA, read_table, rows_to_table, write_table
from data_contracts.tag import TAGS_SCHEMA, TagManifest
from pipeline_config.load import section_dict
from tasks.common.earlier import complete_outputs, current_then_newest
from tasks.common.journal import read_done_mark, write_done_mark
from tasks.common.process_cache import ProcessCache
from tasks.common.shard_workers import WorkerSlot, plan_slots
from tasks.common.stage import StageContext, StageReport, StageResult, StageSpec
from tasks.common.upstream import read_upstream
from tasks.dedup.stage import DEDUP_FILE
from tasks.tag.backends import choose_backend, load_backend, resolve_device
from tasks.tag.core import (
    PARTIAL_SCHEMA,
    kept_posts,
    posts_files,
    read_posts,
    reusable,
    summarise,
    tag_shard,
)
from tasks.tag.merge import Merger, MergeRules
from tasks.tag.model import TaggerFolder, resolve_model
from tasks.tag.visuals import make_tag_sheets, sheet_ids
from tasks.tag.weights import compute_weights

CODE_VERSION = "3"  # 2: shards planned/run one by one (same tables), report pictures; 3: rejects say
# image_missing (was missing_image) and name images by pool-relative path
JOURNAL = "journal"
SUMMARY = "summary.json"
TAGS_FILE = "tags.parquet"
REJECTS_FILE = "rejects.parquet"
SHEET_ITEMS = 24  # posts per picture


# --- shards --------------------------------------------------------------------------------------
def _shard_rels(k: int) -> tuple[str, str, str]:
    """Journal files of shard k, relative to the work folder, in the order they are written."""
    base = f"{JOURNAL}/shard-{k:05d}"
    return f"{base}.tags.parquet", f"{base}.rejects.parquet", f"{base}.done.json"


# One worker process runs many shards of one stage run: read the posts and load the tagger once per
# process (keyed by what decides them; the fingerprint covers the model files).
_POSTS: ProcessCache[pa.Table] = ProcessCache("tag posts")
_FOLDERS: ProcessCache[tuple[TaggerFolder, str]] = ProcessCache("tag model folder + backend kind")
_BACKENDS: ProcessCache[Any] = ProcessCache("tag loaded backend")


def _posts(ctx: StageContext) -> pa.Table:
    """The ingest posts the dedup stage kept (one per near-duplicate group), in id order."""
    manifest, dedup = ctx.upstream["ingest"], ctx.upstream["dedup"]
    # Keyed by content (a forced re-crawl may keep the fingerprint and change the posts).
    key = (ctx.store.root_url, manifest.fingerprint, tuple(manifest.file(r).sha256 for r in posts_files(manifest)),
           dedup.fingerprint, dedup.file(DEDUP_FILE).sha256)

    def load() -> pa.Table:
        kept = read_upstream(ctx.store, dedup, "dedup", DEDUP_SCHEMA, ["id", "kept"])
        return kept_posts(read_posts(ctx.store, manifest), kept)

    return _POSTS.get(key, load)


_REUSE: ProcessCache[tuple[pa.Table, TagManifest] | None] = ProcessCache("tag rows reused from an earlier output")


def _identity(ctx: StageContext) -> dict[str, Any]:
    """What makes two tag outputs give the same row for the same image and tags (compared with an earlier one's)."""
    # lazy: tasks.models imports diffusers
    from tasks.models.identity import file_identity

    folder, kind, _ = _tagger(ctx, load=False)
    cache = Path(ctx.cfg.runtime.cache_dir)
    return {"code_version": CODE_VERSION, "config_digest": digest(section_dict(ctx.cfg, "tag")), "backend": kind,
            "model_identity": file_identity(folder.onnx_path if kind == "onnx" else folder.weights_path, cache),
            "labels_sha256": file_identity(folder.path / "selected_tags.csv", cache),
            "device": resolve_device(ctx.section.device)}


def _identity_of(manifest: TagManifest) -> dict[str, Any]:
    return {"code_version": manifest.code_version, "config_digest": manifest.config_digest,
            "backend": manifest.backend, "model_identity": manifest.model_identity,
            "labels_sha256": manifest.stats.get("labels_sha256"), "device": manifest.stats.get("device")}


def _reuse_source(ctx: StageContext) -> TagManifest | None:
    """The earlier tag output whose rows may be kept: the current one, else the newest, of the same tagger."""
    mine = _identity(ctx)
    found = [m for m in complete_outputs(ctx.store, TagManifest, exclude=ctx.fingerprint)
             if _identity_of(m) == mine and "ingest" in m.upstream]
    return next(iter(current_then_newest(ctx.store, found)), None)


def _reused(ctx: StageContext) -> tuple[pa.Table, TagManifest] | None:
    """(rows of an earlier output that hold for this run's posts, that output), or None (nothing to reuse)."""
    source = _reuse_source(ctx)  # looked up each time (a few manifests): a worker process outlives a run
    if source is None:
        return None

    def load() -> tuple[pa.Table, TagManifest] | None:
        try:
            before = read_posts(ctx.store, ctx.store.read_manifest(IngestManifest, source.upstream["ingest"]))
            rows = read_table(ctx.store.path(source, TAGS_FILE), TAGS_SCHEMA, columns=PARTIAL_SCHEMA.names)
        except BooruflowError as exc:  # its ingest output is gone, a file is broken: tag everything
            ctx.log.info("tag: not reusing rows of %s (%s)", source.fingerprint, exc)
            return None
        kept = reusable(before, rows, _posts(ctx))
        ctx.log.info("tag: %d of %d rows kept from %s (same tagger, same image and tags)", kept.num_rows,
                     _posts(ctx).num_rows, source.fingerprint)
        return kept, source

    return _REUSE.get((ctx.store.root_url, ctx.fingerprint, source.fingerprint, source.created_at), load)


def _tagger(ctx: StageContext, load: bool = True) -> tuple[TaggerFolder, str, Any]:
    """(folder, backend kind, loaded backend; None when not `load` and not loaded in this process yet)."""
    cfg = ctx.section
    key = (ctx.fingerprint, str(ctx.cfg.runtime.cache_dir))

    def find() -> tuple[TaggerFolder, str]:
        folder = resolve_model(cfg.model, Path(ctx.cfg.runtime.cache_dir))
        return folder, choose_backend(folder, cfg.backend, cfg.device)

    folder, kind = _FOLDERS.get(key, find)

    def load_it() -> Any:
        backend = load_backend(folder, kind, cfg.device, cfg.compile)
        ctx.log.info("tag: %s backend on %s, input %d px", backend.name, backend.device, backend.input_size)
        return backend

    return folder, kind, _BACKENDS.get(key, load_it) if load else _BACKENDS.peek(key)


def _shard_of(posts: pa.Table, k: int, size: int) -> dict[str, Any]:
    start, stop = k * size, min(posts.num_rows, (k + 1) * size)
    ids = posts["id"]
    return {"index": k, "start": start, "stop": stop,
            "first_id": ids[start].as_py(), "last_id": ids[stop - 1].as_py()}


def _n_shards(posts: pa.Table, size: int) -> int:
    return (posts.num_rows + size - 1) // size


def _journaled(ctx: StageContext, k: int) -> dict[str, Any] | None:
    """The summary of shard k when it is done (fetching its files when another machine ran it)."""
    tags_rel, rejects_rel, done_rel = _shard_rels(k)
    return read_done_mark(ctx, done_rel, (tags_rel, rejects_rel))


def _finished(ctx: StageContext) -> bool:
    return all((ctx.work / name).exists() for name in (SUMMARY, TAGS_FILE, REJECTS_FILE))


def plan_shards(ctx: StageContext) -> list[dict[str, Any]]:
    """The shards still to tag (all of them on a fresh run; none once the merge has started)."""
    if _finished(ctx):
        return []
    posts = _posts(ctx)
    if posts.num_rows == 0:
        raise StageError("the ingest output has no posts to tag; widen the ingest queries and rerun `fm run ingest`")
    size = ctx.section.shard_size
    return [_shard_of(posts, k, size) for k in range(_n_shards(posts, size)) if _journaled(ctx, k) is None]


def run_shard(ctx: StageContext, shard: dict[str, Any]) -> dict[str, Any]:
    """Tag one shard and journal it (idempotent: a done shard returns its summary at once)."""
    k = int(shard["index"])
    done = _journaled(ctx, k)
    if done is not None:
        return done
    cfg = ctx.section
    posts = _posts(ctx).slice(shard["start"], shard["stop"] - shard["start"])
    ids = posts["id"]
    if posts.num_rows == 0 or ids[0].as_py() != shard["first_id"] or ids[-1].as_py() != shard["last_id"]:
        raise StageError(f"tag shard {k} does not match the ingest posts it was planned on; rerun `fm run tag`")
    reused = _reused(ctx)
    kept = reused[0].filter(pc.is_in(reused[0]["id"], value_set=ids.combine_chunks())) if reused is not None else None
    todo = posts.filter(pc.invert(pc.is_in(ids, value_set=kept["id"]))) if kept is not None else posts
    rows, rejects, device, input_size = [], [], None, None
    if todo.num_rows:  # only the new and changed posts go through the tagger
        folder, kind, backend = _tagger(ctx)
        # Object storage: bring this shard's images into the local pool mirror (once per machine).
        pool = ctx.store.pool_fetch(todo["image_path"].to_pylist(), todo["file_size"].to_pylist())
        rows, rejects = tag_shard(todo, pool, folder, cfg, backend, Merger(folder.labels, MergeRules.from_config(cfg)))
        device, input_size = backend.device, int(backend.input_size)
    else:  # every row kept: the earlier output ran the same tagger on the same device
        device, input_size = reused[1].stats.get("device"), int(reused[1].stats.get("input_size") or 0)  # type: ignore[index]
    table = rows_to_table(rows, PARTIAL_SCHEMA)
    if kept is not None and kept.num_rows:
        table = pa.concat_tables([table, kept.cast(PARTIAL_SCHEMA)]).sort_by("id")
    summary = {"index": k, "tagged": table.num_rows, "rejected": len(rejects), "reused": kept.num_rows if kept
               is not None else 0, "first_id": shard["first_id"], "last_id": shard["last_id"], "device": device,
               "input_size": input_size, "worker": f"{socket.gethostname()}:{os.getpid()}"}  # who ran it (for people)
    tags_rel, rejects_rel, done_rel = _shard_rels(k)
    write_table(table, ctx.work / tags_rel, PARTIAL_SCHEMA)
    write_table(rows_to_table(rejects, REJECTS_SCHEMA), ctx.work / rejects_rel, REJECTS_SCHEMA)
    write_done_mark(ctx, done_rel, summary, (tags_rel, rejects_rel))
    ctx.log.info("tag: shard %d: %d tagged (%d kept from an earlier output), %d rejected", k, table.num_rows,
                 summary["reused"], len(rejects))
    return summary


def shard_slots(ctx: StageContext, n_shards: int) -> list[WorkerSlot]:
    """One worker process per GPU (tag.processes=0 on CUDA), or tag.processes CPU processes."""
    cfg = ctx.section
    device = resolve_device(cfg.device)
    if device == "cpu" and cfg.processes <= 1:
        return []
    return plan_slots(cfg.processes, device, n_shards)


# --- the stage -----------------------------------------------------------------------------------
def _meta(ctx: StageContext, folder: TaggerFolder, kind: str, device: str, input_size: int) -> dict:
    from tasks.models.identity import file_identity  # lazy: tasks.models imports diffusers

    cfg = ctx.section
    weights_path = folder.onnx_path if kind == "onnx" else folder.weights_path
    return {
        "model_name": folder.name,
        # Cached digests: fingerprint_extra already hashed these files for this run's fingerprint.
        "model_identity": file_identity(weights_path, Path(ctx.cfg.runtime.cache_dir)),
        "labels_sha256": file_identity(folder.path / "selected_tags.csv", Path(ctx.cfg.runtime.cache_dir)),
        "labels": len(folder.labels),
        "backend": kind,
        "device": device,
        "input_size": input_size,
        "thresholds": {
            "general": cfg.general_threshold, "character": cfg.character_threshold, "mode": cfg.mode,
            "character_mcut_floor": cfg.character_mcut_floor, "disagree_below": cfg.disagree_below,
        },
    }


def _pictures(ctx: StageContext, tags: pa.Table, posts: pa.Table) -> dict[str, str]:
    """Contact sheets of what the tagger changed; a picture problem never fails the stage."""
    seed = ctx.cfg.seed
    try:
        pool = ctx.store.pool_dir()
        if not ctx.store.is_local:
            wanted = sheet_ids(tags, seed, SHEET_ITEMS)
            shown = posts.filter(pc.is_in(posts["id"], value_set=pa.array(sorted(wanted), pa.int64())))
            pool = ctx.store.pool_fetch(shown["image_path"].to_pylist(), shown["file_size"].to_pylist())
        return make_tag_sheets(tags, posts, pool, ctx.work, seed=seed, max_items=SHEET_ITEMS)
    except Exception as exc:  # noqa: BLE001 - pictures are a report extra
        ctx.log.warning("tag: report pictures skipped (%s: %s)", type(exc).__name__, exc)
        return {}


def build(ctx: StageContext) -> StageResult:
    """Merge the journaled shards (running any still missing) into the stage's tables and report."""
    cfg = ctx.section
    summary_path = ctx.work / SUMMARY
    if _finished(ctx):
        return _result_from_summary(ctx, json.loads(summary_path.read_text()))  # killed while cleaning up

    posts = _posts(ctx)
    if posts.num_rows == 0:
        raise StageError("the ingest output has no posts to tag; widen the ingest queries and rerun `fm run ingest`")
    if cfg.model.startswith("builtin:"):
        ctx.log.warning("tag: %s is a random tiny stand-in (demo/tests); set tag.model to a WD tagger folder "
                        "for real tags", cfg.model)
    folder, kind, _ = _tagger(ctx, load=False)
    n_shards = _n_shards(posts, cfg.shard_size)
    shards = []
    for k in range(n_shards):
        done = _journaled(ctx, k)
        shards.append(done if done is not None else run_shard(ctx, _shard_of(posts, k, cfg.shard_size)))
        ctx.progress((k + 1) / n_shards, f"merging shard {k + 1}/{n_shards}")

    parts = [_shard_rels(k) for k in range(n_shards)]
    tagged = pa.concat_tables([read_table(ctx.work / t, PARTIAL_SCHEMA) for t, _, _ in parts]).sort_by("id")
    rejects = pa.concat_tables([read_table(ctx.work / r, REJECTS_SCHEMA) for _, r, _ in parts]).sort_by("id")
    if tagged.num_rows == 0:
        reasons = Counter(rejects["reason"].to_pylist())
        raise StageError(f"no image could be tagged ({dict(reasons)}); check the images under "
                         f"{ctx.store.pool_url()} or rerun `fm run ingest --force`")

    # Concepts of the final dataset: merged characters, artist/copyright from the posts table.
    meta_posts = posts.filter(pc.is_in(posts["id"], value_set=tagged["id"]))  # both sorted by id
    if meta_posts["id"].to_pylist() != tagged["id"].to_pylist():
        raise ContractError("tag journal does not match the ingest posts; rerun `fm run tag --force`")
    concepts = {
        "character": tagged["character"].to_pylist(),
        "artist": meta_posts["tags_artist"].to_pylist(),
        "copyright": meta_posts["tags_copyright"].to_pylist(),
    }
    weights = compute_weights(concepts, tagged["general"].to_pylist(), cfg.weight)
    final = tagged.append_column("tag_weight", pa.array(weights.weights.astype(np.float32), pa.float32()))
    write_table(final, ctx.work / TAGS_FILE, TAGS_SCHEMA)
    write_table(rejects, ctx.work / REJECTS_FILE, REJECTS_SCHEMA)

    meta = _meta(ctx, folder, kind, shards[0]["device"], int(shards[0]["input_size"]))
    stats, report = summarise(final, rejects, weights, cfg.weight, concepts, meta)
    reused = sum(int(s.get("reused", 0)) for s in shards)
    if reused:
        source = _reused(ctx)
        stats["reused_rows"] = {"rows": reused, "from": source[1].fingerprint if source else None}
        report.summary_md += (f"- {reused} of {final.num_rows} rows kept from tag output `{stats['reused_rows']['from']}` "
                              "(same tagger; image and Danbooru tags unchanged): only the others went through the "
                              "model\n")
    images = _pictures(ctx, final, posts)
    summary = {"row_counts": {"tags": final.num_rows, "rejects": rejects.num_rows}, "stats": stats,
               "meta": meta, "report": {"summary_md": report.summary_md, "tables": report.tables, "images": images}}
    atomic_write_text(summary_path, json.dumps(summary, indent=1, default=str))
    shutil.rmtree(ctx.work / JOURNAL, ignore_errors=True)
    return _result_from_summary(ctx, summary)


def _result_from_summary(ctx: StageContext, summary: dict) -> StageResult:
    shutil.rmtree(ctx.work / JOURNAL, ignore_errors=True)
    meta = summary["meta"]
    return StageResult(
        row_counts=summary["row_counts"],
        stats=summary["stats"],
        manifest_fields={"model_name": meta["model_name"], "model_identity": meta["model_identity"],
                         "backend": meta["backend"], "thresholds": meta["thresholds"]},
        report=StageReport(summary_md=summary["report"]["summary_md"], tables=summary["report"]["tables"],
                           images=summary["report"].get("images", {})),
    )


def fingerprint_extra(cfg) -> dict:
    """The tagger files the config names by path: replacing them in place must rerun the stage."""
    from tasks.models.identity import file_identity  # lazy: tasks.models imports diffusers

    folder = resolve_model(cfg.tag.model, Path(cfg.runtime.cache_dir))
    cache = Path(cfg.runtime.cache_dir)
    files = [p for p in (folder.weights_path, folder.onnx_path, folder.path / "selected_tags.csv") if p]
    return {p.name: file_identity(p, cache) for p in files}


SPEC = StageSpec(name="tag", upstream=("ingest", "dedup"), code_version=CODE_VERSION, build=build, resumable=True,
                 gpu=True, fingerprint_extra=fingerprint_extra, plan_shards=plan_shards, run_shard=run_shard,
                 shard_slots=shard_slots)
