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
"""
from __future__ import annotations

import json
import os
import shutil
import socket
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_contracts.errors import ContractError, StageError
from data_contracts.ingest import POSTS_SCHEMA, IngestManifest
from data_contracts.store import ArtifactStore, atomic_write_text
from data_contracts.tables import REJECTS_SCHEMA, read_table, rows_to_table, write_table
from data_contracts.tag import TAGS_SCHEMA
from tasks.common.journal import read_done_mark, write_done_mark
from tasks.common.process_cache import ProcessCache
from tasks.common.shard_workers import WorkerSlot, plan_slots
from tasks.common.stage import StageContext, StageReport, StageResult, StageSpec
from tasks.tag.backends import choose_backend, load_backend, resolve_device
from tasks.tag.gpu_pipeline import BatchResult, run_pipeline
from tasks.tag.cpu_pipeline import run_cpu_pipeline
from tasks.tag.merge import Merger, MergeRules
from tasks.tag.model import TaggerFolder, resolve_model
from tasks.tag.preprocess import pool_relative
from tasks.tag.visuals import make_tag_sheets
from tasks.tag.weights import compute_weights, weight_stats, weight_tables

CODE_VERSION = "3"  # 2: shards planned/run one by one (same tables), report pictures; 3: rejects say
# image_missing (was missing_image) and name images by pool-relative path
JOURNAL = "journal"
SUMMARY = "summary.json"
TAGS_FILE = "tags.parquet"
REJECTS_FILE = "rejects.parquet"
PARTIAL_SCHEMA = pa.schema([f for f in TAGS_SCHEMA if f.name != "tag_weight"])
POST_COLUMNS = ["id", "tags_general", "tags_character", "tags_copyright", "tags_artist", "image_path", "file_size"]
SHEET_ITEMS = 24  # posts per picture


# --- input ---------------------------------------------------------------------------------------
def posts_files(manifest: IngestManifest) -> list[str]:
    """The posts table of an ingest output: posts.parquet, or shards posts/*.parquet / posts-*.parquet."""
    names = [f.path for f in manifest.files if f.path.endswith(".parquet") and
             (f.path == "posts.parquet" or f.path.startswith(("posts/", "posts-", "posts_")))]
    if not names:
        raise ContractError(f"ingest {manifest.fingerprint}: manifest lists no posts.parquet; rerun `fm run ingest`")
    return sorted(names)


def read_posts(store: ArtifactStore, manifest: IngestManifest) -> pa.Table:
    tables = []
    for rel in posts_files(manifest):
        where = f"ingest/{manifest.fingerprint}/{rel}"
        tables.append(read_table(store.path(manifest, rel), POSTS_SCHEMA, where, columns=POST_COLUMNS))
    table = pa.concat_tables(tables).sort_by("id")
    if table.num_rows != len(pc.unique(table["id"])):
        raise ContractError(f"ingest {manifest.fingerprint}: posts table repeats ids; rerun `fm run ingest --force`")
    return table


# --- tagging -------------------------------------------------------------------------------------
def _batches(folder: TaggerFolder, cfg: Any, items: list[tuple[int, Path]], backend) -> Iterator[BatchResult]:
    if backend.name == "torch" and backend.device == "cuda":
        return run_pipeline(items, lambda x: backend.predict_tensor(x, normalised=True), backend.input_size,
                            backend.device, batch_size=cfg.batch_size, workers=max(cfg.workers, 4),
                            transform=backend.normalise)
    return run_cpu_pipeline(items, backend.predict, backend.input_size, cfg.batch_size, cfg.workers)


def tag_shard(posts: pa.Table, pool: Path, folder: TaggerFolder, cfg: Any, backend, merger: Merger
              ) -> tuple[list[dict], list[dict]]:
    ids = posts["id"].to_pylist()
    general = dict(zip(ids, posts["tags_general"].to_pylist()))
    character = dict(zip(ids, posts["tags_character"].to_pylist()))
    rels = dict(zip(ids, posts["image_path"].to_pylist()))
    items = [(i, pool / rel) for i, rel in rels.items()]
    rows, rejects = [], []
    for result in _batches(folder, cfg, items, backend):
        for key, probs in zip(result.keys, result.probs):
            if not np.all(np.isfinite(probs)):
                rejects.append({"id": key, "reason": "tagger_nan", "detail": "the tagger returned NaN/inf"})
                continue
            rows.append({"id": key, **merger.merge(probs, general[key], character[key])})
        for key, err in result.errors:
            detail = pool_relative(err.detail, pool / rels[key], rels[key], pool)
            rejects.append({"id": key, "reason": err.reason, "detail": detail[:500]})
    rows.sort(key=lambda r: r["id"])
    rejects.sort(key=lambda r: r["id"])
    return rows, rejects


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
    manifest = ctx.upstream["ingest"]
    # Keyed by content (a forced re-crawl may keep the fingerprint and change the posts).
    key = (ctx.store.root_url, manifest.fingerprint, tuple(manifest.file(r).sha256 for r in posts_files(manifest)))
    return _POSTS.get(key, lambda: read_posts(ctx.store, manifest))


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
    folder, kind, backend = _tagger(ctx)
    # Object storage: bring this shard's images into the local pool mirror (once per machine).
    pool = ctx.store.pool_fetch(posts["image_path"].to_pylist(), posts["file_size"].to_pylist())
    rows, rejects = tag_shard(posts, pool, folder, cfg, backend, Merger(folder.labels, MergeRules.from_config(cfg)))
    summary = {"index": k, "tagged": len(rows), "rejected": len(rejects), "first_id": shard["first_id"],
               "last_id": shard["last_id"], "device": backend.device, "input_size": int(backend.input_size),
               "worker": f"{socket.gethostname()}:{os.getpid()}"}  # which process ran it (for people)
    tags_rel, rejects_rel, done_rel = _shard_rels(k)
    write_table(rows_to_table(rows, PARTIAL_SCHEMA), ctx.work / tags_rel, PARTIAL_SCHEMA)
    write_table(rows_to_table(rejects, REJECTS_SCHEMA), ctx.work / rejects_rel, REJECTS_SCHEMA)
    write_done_mark(ctx, done_rel, summary, (tags_rel, rejects_rel))
    ctx.log.info("tag: shard %d: %d tagged, %d rejected", k, len(rows), len(rejects))
    return summary


def shard_slots(ctx: StageContext, n_shards: int) -> list[WorkerSlot]:
    """One worker process per GPU (tag.processes=0 on CUDA), or tag.processes CPU processes."""
    cfg = ctx.section
    device = resolve_device(cfg.device)
    if device == "cpu" and cfg.processes <= 1:
        return []
    return plan_slots(cfg.processes, device, n_shards)


# --- report --------------------------------------------------------------------------------------
def _counter_rows(counter: Counter, key: str, top: int, extra: dict | None = None) -> list[dict]:
    rows = []
    for name, n in counter.most_common(top):
        row = {key: name, "images": int(n)}
        if extra is not None:
            row["mean_prob"] = round(extra[name] / n, 4)
        rows.append(row)
    return rows


def _report(tags: pa.Table, rejects: pa.Table, weights, weight_cfg, concepts, meta: dict) -> tuple[dict, StageReport]:
    n = tags.num_rows
    added, added_p, disputed, disputed_p = Counter(), defaultdict(float), Counter(), defaultdict(float)
    for lst in tags["added"].to_pylist():
        for d in lst:
            added[d["tag"]] += 1
            added_p[d["tag"]] += d["prob"]
    for lst in tags["disputed"].to_pylist():
        for d in lst:
            disputed[d["tag"]] += 1
            disputed_p[d["tag"]] += d["prob"]
    ratings = Counter(tags["rating"].to_pylist())
    reasons = Counter(rejects["reason"].to_pylist())
    n_added = sum(added.values())
    n_disputed = sum(disputed.values())
    wstats = weight_stats(weights, weight_cfg.bounds)
    stats = {
        **meta,
        "images_tagged": n,
        "images_rejected": rejects.num_rows,
        "reject_reasons": dict(reasons),
        "added_per_image": n_added / max(n, 1),
        "disputed_per_image": n_disputed / max(n, 1),
        "rating_counts": dict(ratings),
        "weight": wstats,
    }
    tables = {
        "rating_counts": [{"rating": r, "images": int(ratings.get(r, 0))}
                          for r in ("general", "sensitive", "questionable", "explicit")],
        "top_added_tags": _counter_rows(added, "tag", 30, added_p),
        "top_disputed_tags": _counter_rows(disputed, "tag", 30, disputed_p),
        "reject_reasons": [{"reason": r, "images": int(c)} for r, c in reasons.most_common()],
        **weight_tables(weights, concepts, weight_cfg.bounds, weight_cfg.report_top),
    }
    summary = (
        f"### tag\n"
        f"- tagger **{meta['model_name']}** ({meta['backend']} on {meta['device']}, input {meta['input_size']} px, "
        f"{meta['labels']} labels, weights sha256 `{meta['model_identity'][:16]}`)\n"
        f"- {n} images tagged, {rejects.num_rows} rejected ({', '.join(f'{r}: {c}' for r, c in reasons.items()) or 'none'})\n"
        f"- tagger added {n_added / max(n, 1):.2f} tags per image; {n_disputed / max(n, 1):.2f} Danbooru tags "
        f"per image disputed (prob < {meta['thresholds']['disagree_below']})\n"
        f"- thresholds: {meta['thresholds']}\n"
        f"- tag_weight ({weight_cfg.method}, bounds {list(weight_cfg.bounds)}): mean {wstats.get('mean', 1):.3f}, "
        f"min {wstats.get('min', 1):.3f}, max {wstats.get('max', 1):.3f}, p50 {wstats.get('p50', 1):.3f}\n"
    )
    if str(meta["model_name"]).startswith("builtin:"):
        summary += "- note: the built-in tiny tagger has random weights (demo); its added/disputed tags are not meaningful\n"
    return stats, StageReport(summary_md=summary, tables=tables)


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


def _sheet_ids(tags: pa.Table, seed: int) -> set[int]:
    """The posts make_tag_sheets can show (the same `pick` over the same rows): fetched from object storage
    before drawing. Were the two to drift apart, a tile would only show blank, never fail the stage."""
    from tasks.common.visuals import pick

    ids = tags["id"].to_numpy()
    n_added = np.array([len(a or []) for a in tags["added"].to_pylist()])
    n_disputed = np.array([len(d or []) for d in tags["disputed"].to_pylist()])
    chosen: set[int] = set()
    for rows in (np.flatnonzero((n_added > 0) | (n_disputed > 0)), np.flatnonzero(n_disputed > 0)):
        chosen.update(int(i) for i in ids[rows][pick(ids[rows], SHEET_ITEMS, seed)])
    return chosen


def _pictures(ctx: StageContext, tags: pa.Table, posts: pa.Table) -> dict[str, str]:
    """Contact sheets of what the tagger changed; a picture problem never fails the stage."""
    seed = ctx.cfg.seed
    try:
        pool = ctx.store.pool_dir()
        if not ctx.store.is_local:
            wanted = _sheet_ids(tags, seed)
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
    stats, report = _report(final, rejects, weights, cfg.weight, concepts, meta)
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


SPEC = StageSpec(name="tag", upstream=("ingest",), code_version=CODE_VERSION, build=build, resumable=True,
                 gpu=True, fingerprint_extra=fingerprint_extra, plan_shards=plan_shards, run_shard=run_shard,
                 shard_slots=shard_slots)
