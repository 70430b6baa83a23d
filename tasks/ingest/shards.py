"""Ingest over a Dask or Ray task runner: the crawl here, the downloads by shard on the cluster's workers.

A query's pages are one cursor walk (Danbooru's `page=b<id>` cannot be split), so `plan_shards` crawls every
query to its end without downloading (pages journalled as in the one-process crawl; a rerun resumes from the
cursors and a finished crawl costs no request). The taken posts, in crawl order, are then cut into shards
of `ingest.shard_posts`; shard k's posts go to `journal/shard-<k>.posts.jsonl`. `run_shard` downloads and
verifies them into the shared pool on whichever worker the runner picks, journals each outcome in
`journal/shard-<k>.downloads.jsonl` (resumed after a kill: done posts are skipped) and writes a done mark
last. On object storage each file is published for other machines (ArtifactStore.work_put / work_get).
The ledger replays the shard journals with its own, so the merge writes the same posts.parquet and
rejects.parquet as the one-process crawl. Under the thread runner the stage stays one task with the crawl
and the downloads pipelined in one event loop (the faster way on one machine).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import socket
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

from data_contracts.errors import ConfigError, StageError
from data_contracts.store import atomic_write_text
from pipeline_config.ingest import EMBEDDED_URL, IngestConfig
from tasks.common.process_cache import ProcessCache
from tasks.common.stage import StageContext
from tasks.ingest.api import resolve_credentials
from tasks.ingest.crawl import (
    crawl_metadata,
    download_posts,
    pending_error,
    query_plan,
    run_async,
    verify_workers,
)
from tasks.ingest.dump_reader import (
    image_source,
    import_dump,
    import_dump_files,
    metadata_files,
)
from tasks.ingest.embedded import api_endpoint, served_by
from tasks.common.journal import Journal, publish_done, read_done_mark, read_records, write_done_mark
from tasks.ingest.ledger import SHARD_DOWNLOADS, Ledger, is_final
from tasks.ingest.parse import Post

JOURNAL_DIR = "journal"
CRAWL_STATS = f"{JOURNAL_DIR}/crawl.json"  # the metadata pass's figures, for the merge's report


def check_queries(cfg: IngestConfig) -> None:
    if cfg.source == "danbooru_api" and not cfg.queries and cfg.api.base_url != EMBEDDED_URL:
        raise ConfigError("ingest.queries is empty: list at least one {tags, quota} query to crawl "
                          f"{cfg.api.base_url} (an empty list crawls everything, allowed only for the embedded "
                          "mini-booru and dumps)")


def public_url(url: str) -> str:
    """scheme://host[:port] only: never user:password@ or query strings in manifests."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path.rstrip('/')}"


def source_description(cfg: IngestConfig) -> str:
    if cfg.source == "danbooru_dump":
        return f"dump:{cfg.dump.posts_path}"
    return EMBEDDED_URL if cfg.api.base_url == EMBEDDED_URL else public_url(cfg.api.base_url)


def _credentials(cfg: IngestConfig) -> tuple[str | None, str | None]:
    return (None, None) if cfg.api.base_url == EMBEDDED_URL else resolve_credentials(cfg.api)


def _authenticated(cfg: IngestConfig) -> bool:
    return cfg.source == "danbooru_api" and _credentials(cfg) != (None, None)


def _rels(k: int, size: int) -> tuple[str, str, str]:
    """Files of shard k of `size` posts, relative to the work folder: post list, download journal, done mark.
    The size is in the name: a resume with another ingest.shard_posts cuts other shards, and must not take
    an old shard's done mark for a new one (the old journals still count: the ledger reads every one)."""
    base = f"{JOURNAL_DIR}/shard-{size}-{k:05d}"
    return f"{base}.posts.jsonl", f"{JOURNAL_DIR}/{SHARD_DOWNLOADS.format(size, k)}", f"{base}.done.json"


def _journaled(ctx: StageContext, k: int, shard: dict[str, Any]) -> dict[str, Any] | None:
    """Shard k's summary when it is done: a done mark for these very posts and an outcome for each of them
    in its journal (fetched from the store when another machine ran it, fresh when the mark came from there)."""
    _, downloads_rel, done_rel = _rels(k, ctx.section.shard_posts)
    for refresh in (False, True) if not ctx.store.is_local else (False,):
        summary = read_done_mark(ctx, done_rel, (downloads_rel,), refresh=refresh)
        if summary is None:
            continue
        journal = ctx.work / downloads_rel  # read_done_mark fetched it when another machine wrote it
        same = all(summary.get(key) == shard[key] for key in ("first_id", "last_id", "posts"))
        if same and len(_outcomes(journal)) >= summary["posts"]:
            return summary
    return None


def crawl(ctx: StageContext) -> None:
    """The metadata pass: every query's pages (or the dump's records, or an update's requests and selection) into
    the ledger, no files (an update journals the kept posts' pool files as their outcomes)."""
    from tasks.ingest.stage import update_base  # the stage module imports this one

    cfg: IngestConfig = ctx.section
    check_queries(cfg)
    plan = query_plan(cfg)
    base = update_base(ctx)
    if base is not None:
        _update_metadata(ctx, plan, base)
        return
    ledger = Ledger(ctx.work / JOURNAL_DIR, len(plan), keep_pending=False)
    try:
        if ledger.dump_done if cfg.source == "danbooru_dump" else all(q.done for q in ledger.queries):
            return  # finished by an earlier call (the plan, or a run before a kill)
        if cfg.source == "danbooru_api":
            login, api_key = _credentials(cfg)
            with api_endpoint(cfg, ctx.cfg.runtime.cache_dir) as (base_url, _):
                ctx.log.info("ingest: crawling %s (%d queries) before the downloads are sharded",
                             source_description(cfg), len(plan))
                stats = run_async(crawl_metadata(cfg, base_url, ledger, login=login, api_key=api_key, log=ctx.log))
        else:
            stats = {"dump": import_dump(cfg, ledger, ctx.store.pool_dir(), plan, progress=ctx.progress,
                                         log=ctx.log, workers=verify_workers(cfg), download=False)}
    finally:
        ledger.close()
    atomic_write_text(ctx.work / CRAWL_STATS, json.dumps(stats))


def _update_metadata(ctx: StageContext, plan: list[tuple[str, str, int]], base) -> None:
    """An update's requests and selection, and the kept posts' outcomes (idempotent: a finished one sends nothing)."""
    from tasks.ingest.known import KnownOutput
    from tasks.ingest.update import open_window, run_update

    cfg: IngestConfig = ctx.section
    ledger = Ledger(ctx.work / JOURNAL_DIR, len(plan))
    try:
        login, api_key = _credentials(cfg)
        window = open_window(ctx.work / JOURNAL_DIR, base, cfg)
        with api_endpoint(cfg, ctx.cfg.runtime.cache_dir) as (base_url, _):
            stats = run_async(run_update(cfg, plan, base_url, ledger, KnownOutput(ctx.store, base), window,
                                         ctx.store.pool_dir(), login=login, api_key=api_key, log=ctx.log,
                                         download=False))
    finally:
        ledger.close()
    if not (ctx.work / CRAWL_STATS).exists() or stats["http"].get("requests"):  # a later no-op call keeps the figures
        atomic_write_text(ctx.work / CRAWL_STATS, json.dumps(stats))


def _settled_here(ctx: StageContext) -> set[int]:
    """Posts whose outcome this process's journal already holds (an update's kept posts): no shard downloads them."""
    return {int(r["id"]) for r in read_records(ctx.work / JOURNAL_DIR / "downloads.jsonl") if is_final(r)}


def _shard_posts(ctx: StageContext) -> Iterator[tuple[int, list[Post]]]:
    """(k, posts) of every shard: the ledger's taken posts in crawl order that still need their file,
    `shard_posts` at a time."""
    size = ctx.section.shard_posts
    settled = _settled_here(ctx)
    ledger = Ledger(ctx.work / JOURNAL_DIR, len(query_plan(ctx.section)), keep_pending=False)
    try:
        chunk: list[Post] = []
        k = 0
        for _, post in ledger.taken():
            if post.id in settled:
                continue
            chunk.append(post)
            if len(chunk) == size:
                yield k, chunk
                k, chunk = k + 1, []
        if chunk:
            yield k, chunk
    finally:
        ledger.close()


def plan_shards(ctx: StageContext) -> list[dict[str, Any]]:
    """Crawl, then list the download shards not done yet (none unless the stage is sharded over a cluster
    runner's workers: StageContext.sharded)."""
    if not ctx.sharded:
        return []
    crawl(ctx)
    shards = []
    authenticated = _authenticated(ctx.section)
    for k, posts in _shard_posts(ctx):
        shard = {"index": k, "posts": len(posts), "first_id": posts[0].id, "last_id": posts[-1].id,
                 "authenticated": authenticated}
        if _journaled(ctx, k, shard) is not None:
            continue
        posts_rel, _, _ = _rels(k, ctx.section.shard_posts)
        # The same posts every time (the finished crawl's journal, in order): rewriting is safe.
        atomic_write_text(ctx.work / posts_rel, "".join(json.dumps(p.to_json()) + "\n" for p in posts))
        ctx.store.work_put(ctx.stage, ctx.fingerprint, posts_rel)
        shards.append(shard)
    ctx.log.info("ingest: %d download shards of up to %d posts to run", len(shards), ctx.section.shard_posts)
    return shards


def _outcomes(path: Path) -> dict[int, bool]:
    """Post id -> ok of every complete record of a shard journal (a later record of an id wins)."""
    return {int(r["id"]): bool(r["ok"]) for r in read_records(path) if is_final(r)}


def run_shard(ctx: StageContext, shard: dict[str, Any]) -> dict[str, Any]:
    """Download + verify one shard's posts into the pool (idempotent: a done shard returns its summary)."""
    k = int(shard["index"])
    cfg: IngestConfig = ctx.section
    posts_rel, downloads_rel, done_rel = _rels(k, cfg.shard_posts)
    done = _journaled(ctx, k, shard)
    if done is not None:
        publish_done(ctx, done_rel, (downloads_rel,))  # a kill may have come between the mark and its upload
        return done
    login, api_key = _credentials(cfg) if cfg.source == "danbooru_api" else (None, None)
    if shard.get("authenticated") and not login:
        raise StageError(f"ingest shard {k}: the crawl was authenticated but this worker has no credentials "
                         f"(set {cfg.api.login_env} and {cfg.api.api_key_env} on every worker)")
    posts_file = ctx.store.work_get(ctx.stage, ctx.fingerprint, posts_rel)
    if posts_file is None:
        raise StageError(f"ingest shard {k}: its post list {posts_rel} is missing; rerun `fm run ingest`")
    posts = [Post.from_json(json.loads(line)) for line in posts_file.read_text().splitlines() if line]
    if not posts or posts[0].id != shard["first_id"] or posts[-1].id != shard["last_id"]:
        raise StageError(f"ingest shard {k} does not match the crawl it was planned on; rerun `fm run ingest`")
    journal_path = ctx.work / downloads_rel
    finished = _outcomes(journal_path)
    todo = [p for p in posts if p.id not in finished]
    pool = ctx.store.pool_dir()
    pool.mkdir(parents=True, exist_ok=True)
    deferred: dict[int, tuple[str, str]] = {}  # transient failures: not journaled, the shard stays unfinished
    with Journal(journal_path) as journal:  # opening cuts a torn last line left by a kill
        if cfg.source == "danbooru_api":
            # A daemonic worker (Dask's) may not start processes of its own: decode in threads there.
            mode = "thread" if multiprocessing.current_process().daemon else None
            with api_endpoint(cfg, ctx.cfg.runtime.cache_dir) as (base_url, embedded):
                if embedded:  # this worker serves the mini-booru on a port of its own
                    todo = [served_by(post, base_url) for post in todo]
                stats = run_async(download_posts(cfg, base_url, todo, journal.append, pool, login=login,
                                                 api_key=api_key, log=ctx.log, verify_mode=mode,
                                                 deferred=deferred))
        else:
            stats = {"dump": import_dump_files(cfg, todo, pool, journal.append, workers=verify_workers(cfg),
                                               images=_dump_images(cfg))}
        journal.sync()  # every outcome on disk before the done mark (a power loss must not keep the mark only)
    outcomes = _outcomes(journal_path)
    if deferred:
        raise pending_error(deferred, len(outcomes))
    missing = [p.id for p in posts if p.id not in outcomes]
    if missing:
        raise StageError(f"ingest shard {k}: no outcome recorded for posts {missing[:5]}")
    summary = {"index": k, "posts": len(posts), "ok": sum(outcomes[p.id] for p in posts),
               "failed": sum(not outcomes[p.id] for p in posts), "first_id": shard["first_id"],
               "last_id": shard["last_id"], "resumed": len(posts) - len(todo), "run": stats,
               "worker": f"{socket.gethostname()}:{os.getpid()}"}  # which process ran it (for people)
    write_done_mark(ctx, done_rel, summary, (downloads_rel,))
    ctx.log.info("ingest: shard %d: %d ok, %d failed", k, summary["ok"], summary["failed"])
    return summary


# A worker runs many shards of one dump: index its tar files once per process, not once per shard.
_IMAGES: ProcessCache[Any] = ProcessCache("ingest dump image index")


def _dump_images(cfg: IngestConfig):
    return _IMAGES.get((cfg.dump.posts_path, cfg.dump.images_path),
                       lambda: image_source(cfg.dump, metadata_files(cfg.dump)[1]))


def _add(total: dict[str, Any], part: dict[str, Any]) -> None:
    """Sum the numbers of `part` into `total`, nested dicts too (counters of the shards' clients)."""
    for key, value in part.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            total[key] = round(total.get(key, 0) + value, 3)
        elif isinstance(value, dict):
            _add(total.setdefault(key, {}), value)


def complete(ctx: StageContext) -> dict[str, Any]:
    """Before the merge: the crawl finished, every shard done (a shard nobody ran is run here), every
    shard's journal in the work folder. Returns the run's figures for the report."""
    crawl(ctx)
    summaries = {int(s["index"]): s for s in ctx.shard_results}
    authenticated = _authenticated(ctx.section)
    for k, posts in _shard_posts(ctx):
        shard = {"index": k, "posts": len(posts), "first_id": posts[0].id, "last_id": posts[-1].id,
                 "authenticated": authenticated}
        summary = _journaled(ctx, k, shard)
        if summary is None:
            ctx.log.info("ingest: shard %d was not finished by a worker; running it here", k)
            posts_rel, _, _ = _rels(k, ctx.section.shard_posts)
            if ctx.store.work_get(ctx.stage, ctx.fingerprint, posts_rel) is None:
                atomic_write_text(ctx.work / posts_rel, "".join(json.dumps(p.to_json()) + "\n" for p in posts))
            summary = run_shard(ctx, shard)
        summaries[k] = summary
    stats_file = ctx.work / CRAWL_STATS
    crawl_stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    run: dict[str, Any] = {key: value for key, value in crawl_stats.items() if key != "dump"}
    totals: dict[str, Any] = {}
    for summary in summaries.values():
        _add(totals, summary.get("run") or {})
    run["http"] = {**(crawl_stats.get("http") or {})}
    _add(run["http"], totals.get("http") or {})
    if "downloads" in totals:
        run["downloads"] = totals["downloads"]
    if "dump" in totals or "dump" in crawl_stats:
        run["dump"] = {**(crawl_stats.get("dump") or {}), **(totals.get("dump") or {})}
    run["shards"] = {"count": len(summaries), "shard_posts": ctx.section.shard_posts,
                     "workers": sorted({s.get("worker", "?") for s in summaries.values()})}
    return run
