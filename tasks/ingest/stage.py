"""The ingest stage: Danbooru queries (or a dump) -> posts.parquet + rejects.parquet + verified image pool.

Work happens in ctx.work (kept across kills): the ledger's journals there let a rerun resume the crawl
from its last page and download only what is missing; images go to the shared content-addressed pool
`<pool>/images/<md5[:2]>/<md5>.<ext>`. The journals are removed once the tables are written, so the
committed output holds posts.parquet, rejects.parquet, the report and its pictures (visuals/*.png:
contact sheets per character and series, rejects whose image is in the pool).

With `ingest.update.enabled` (`fm run ingest --update`) the output extends the newest output of the same config
instead (tasks/ingest/update.py): same tables, written from the same journals, plus what changed in the manifest.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from data_contracts.errors import ConfigError, StageError
from data_contracts.ingest import POSTS_SCHEMA, REJECTS, SNAPSHOT_KEY, UPDATE_KEY, IngestManifest
from data_contracts.tables import read_table
from pipeline_config.ingest import EMBEDDED_URL, IngestConfig
from pipeline_config.schema import PipelineConfig
from pipeline_config.secrets import redact
from tasks.common.pictures import draw_pictures
from tasks.common.stage import StageContext, StageReport, StageResult, StageSpec, compute_fingerprint
from tasks.ingest import diff, lineage, shards
from tasks.ingest.api import resolve_credentials
from tasks.ingest.assemble import assemble
from tasks.ingest.crawl import crawl_api, query_plan, run_async, verify_workers
from tasks.ingest.dump_reader import import_dump, metadata_files
from tasks.ingest.embedded import api_endpoint, generator_version
from tasks.common.journal import Journal
from tasks.ingest.known import KnownOutput
from tasks.ingest.ledger import Ledger
from tasks.ingest.shards import JOURNAL_DIR, check_queries, source_description
from tasks.ingest.update import file_counts, open_window, run_update
from tasks.ingest.visuals import (
    make_character_sheets,
    make_rejects_sheet,
    make_series_sheets,
)

ATTEMPTS = "attempts.jsonl"  # one line per run that worked on this output (resumes after kills)
MAX_ITEMS = 24  # thumbnails per contact sheet
MAX_GROUPS = 12  # sheets per kind: the largest characters / series


def build(ctx: StageContext) -> StageResult:
    cfg: IngestConfig = ctx.section
    started = time.monotonic()
    pool = ctx.store.pool_dir()
    pool.mkdir(parents=True, exist_ok=True)
    plan = query_plan(cfg)
    check_queries(cfg)
    source_desc = source_description(cfg)
    base = update_base(ctx)  # the output an update extends (None: a crawl from scratch)
    # Under Dask/Ray the downloads ran as shards on the runner's workers: their journals are the input.
    attempts = count_attempt(ctx.work / JOURNAL_DIR)
    run_stats = shards.complete(ctx) if ctx.sharded else None
    ledger = Ledger(ctx.work / JOURNAL_DIR, len(plan))
    try:
        if run_stats is None:
            run_stats = _fetch_here(ctx, ledger, plan, source_desc, base)
        run_stats["attempts"] = attempts
        ctx.progress(0.99, "writing posts.parquet and rejects.parquet")
        rss = {"after_crawl": _rss_mib()}
        t_assemble = time.monotonic()
        row_counts, stats, summary, tables, reject_images = assemble(ctx.work, ledger, cfg, plan, source_desc,
                                                                     run_stats)
        files = file_counts(ledger) if base is not None else {}
    finally:
        ledger.close()
    if base is not None:  # what changed, against the extended output (before the journals go: the window is there)
        window = open_window(ctx.work / JOURNAL_DIR, base, cfg)
        record, update_tables, update_md = diff.record(ctx.store, base, ctx.work, [label for label, _, _ in plan],
                                                       window, cfg.update.identity(), run_stats, files)
        stats[SNAPSHOT_KEY] = record.snapshot
        stats[UPDATE_KEY] = record.model_dump(mode="json")
        tables.update(update_tables)
        summary += update_md
        ctx.log.info("ingest: update of %s: %s", base.fingerprint, update_md.strip().splitlines()[2])
    # Pictures before the journals go: a kill while drawing then resumes from the journals, not a new crawl.
    ctx.progress(0.995, "drawing contact sheets")
    t_pictures = time.monotonic()
    rss["after_tables"] = _rss_mib()
    images, note = make_pictures(ctx, reject_images)
    rss["after_pictures"] = _rss_mib()
    stats["run"]["rss_mib"] = rss  # this process's resident memory at each step (Linux; None elsewhere)
    stats["run"]["seconds"] = round(time.monotonic() - started, 2)
    stats["run"]["assemble_seconds"] = round(t_pictures - t_assemble, 2)
    stats["run"]["pictures_seconds"] = round(time.monotonic() - t_pictures, 2)
    shutil.rmtree(ctx.work / JOURNAL_DIR, ignore_errors=True)
    reasons = {row["reason"]: row["count"] for row in tables["rejects_by_reason"]}
    ctx.log.info(redact(f"ingest: {row_counts['posts']} posts, {row_counts['rejects']} rejects"))
    return StageResult(
        row_counts=row_counts,
        stats=stats,
        manifest_fields={"source": cfg.source, "queries": [label for label, _, _ in plan],
                         "reject_reasons": reasons},
        report=StageReport(summary_md=summary + note, tables=tables, images=images),
    )


def _fetch_here(ctx: StageContext, ledger: Ledger, plan: list[tuple[str, str, int]],
                source_desc: str, base: IngestManifest | None) -> dict[str, Any]:
    """Crawl (or read the dump, or update `base`) with the downloads pipelined in this process; returns the run's
    figures."""
    cfg: IngestConfig = ctx.section
    pool = ctx.store.pool_dir()
    if cfg.source == "danbooru_dump":
        return {"dump": import_dump(cfg, ledger, pool, plan, progress=ctx.progress, log=ctx.log,
                                    workers=verify_workers(cfg))}
    login, api_key = (None, None) if cfg.api.base_url == EMBEDDED_URL else resolve_credentials(cfg.api)
    if base is not None:
        known = KnownOutput(ctx.store, base)
        window = open_window(ctx.work / JOURNAL_DIR, base, cfg)
        with api_endpoint(cfg, ctx.cfg.runtime.cache_dir) as (base_url, embedded):
            ctx.log.info("ingest: updating %s (snapshot %s) from %s: changes since %s, uploads since %s in full",
                         base.fingerprint, lineage.snapshot_text(base.snapshot()), source_desc,
                         lineage.snapshot_text(window.changes_since), lineage.snapshot_text(window.recent_since))
            return run_async(run_update(cfg, plan, base_url, ledger, known, window, pool, login=login,
                                        api_key=api_key, log=ctx.log, embedded=embedded))
    with api_endpoint(cfg, ctx.cfg.runtime.cache_dir) as (base_url, embedded):
        ctx.log.info("ingest: crawling %s (%d queries, %s)", source_desc, len(plan),
                     "authenticated" if login else "anonymous")
        return run_async(crawl_api(cfg, base_url, ledger, pool, login=login, api_key=api_key,
                                   progress=ctx.progress, log=ctx.log, embedded=embedded))


def count_attempt(folder: Path) -> int:
    """Journal the start of this attempt; returns how many attempts (this one included) worked on the output."""
    folder.mkdir(parents=True, exist_ok=True)
    with Journal(folder / ATTEMPTS) as journal:
        journal.append({"started": time.time(), "pid": os.getpid()}, sync=True)
        return sum(1 for _ in journal.records())


def _rss_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def make_pictures(ctx: StageContext, reject_images: dict[int, str]) -> tuple[dict[str, str], str]:
    """Character and series contact sheets, and the rejects whose image is in the pool, under visuals/."""
    pool: Path = ctx.store.pool_dir()
    seed = ctx.cfg.seed
    columns = ["id", "score", "image_path", "tags_character", "tags_copyright"]

    read: dict[str, Any] = {}

    def posts():  # read once, on first use (inside a job, so a read error is that job's failure)
        if "posts" not in read:
            read["posts"] = read_table(ctx.work / "posts.parquet", POSTS_SCHEMA, columns=columns)
        return read["posts"]

    def rejects_sheet() -> dict[str, str]:
        rejects = read_table(ctx.work / "rejects.parquet", REJECTS, columns=["id", "reason", "detail"])
        if ctx.store.is_local:
            return make_rejects_sheet(rejects, pool, ctx.work, reject_images, seed=seed, max_items=MAX_ITEMS)
        # Object storage: a shard's worker may have pooled the files; ask the store, fetch only those shown.
        return make_rejects_sheet(rejects, pool, ctx.work, reject_images, seed=seed, max_items=MAX_ITEMS,
                                  exists=lambda rel: ctx.store.pool_size(rel) is not None, fetch=ctx.store.pool_fetch)

    return draw_pictures(ctx, {
        "character": lambda: make_character_sheets(posts(), pool, ctx.work, seed=seed, max_items=MAX_ITEMS,
                                                   max_groups=MAX_GROUPS, fetch=ctx.store.pool_fetch),
        "series": lambda: make_series_sheets(posts(), pool, ctx.work, seed=seed, max_items=MAX_ITEMS,
                                             max_groups=MAX_GROUPS, fetch=ctx.store.pool_fetch),
        "rejects": rejects_sheet,
    })


def fingerprint_extra(cfg: PipelineConfig) -> dict[str, Any]:
    """What decides the output besides the config: the dump's metadata files, the mini-booru generator; for an
    update (`--update`), the output it extends and its settings (tasks/ingest/lineage.py)."""
    section: IngestConfig = cfg.ingest
    if section.source == "danbooru_dump":
        try:
            files, _ = metadata_files(section.dump)
        except ConfigError:
            return {}  # build() raises the same error with its message
        return {"dump": [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]}
    extra: dict[str, Any] = {"minibooru_generator": generator_version()} if section.api.base_url == EMBEDDED_URL else {}
    if section.update.enabled:
        extra.update(lineage.update_extra(cfg, plain_fingerprint))
    return extra


def newest_snapshot(cfg: PipelineConfig, store, fingerprint: str) -> str | None:
    """A run without --update uses the newest output of its crawl's lineage: an update of it when one is newer
    than the crawl (tasks/ingest/lineage.py), so the later stages see the newest data. --force crawls anew."""
    if cfg.ingest.update.enabled or cfg.ingest.source != "danbooru_api":
        return None
    latest = lineage.newest(store, fingerprint)
    return latest.fingerprint if latest is not None else None


def plain_fingerprint(cfg: PipelineConfig) -> str:
    """The fingerprint of the config's from-scratch crawl (the root of its updates' lineage)."""
    return compute_fingerprint(SPEC, lineage.plain(cfg), {})


def update_base(ctx: StageContext) -> IngestManifest | None:
    """The output this run extends (None: update mode is off, or nothing of this config exists yet, so the
    update is the from-scratch crawl itself)."""
    if not ctx.section.update.enabled:
        return None
    base = lineage.newest(ctx.store, plain_fingerprint(ctx.cfg))
    if base is None:
        ctx.log.info("ingest: --update found no earlier output of these ingest settings to extend (an update extends "
                     "only a crawl of the same ingest section): crawling from scratch")
        return None
    if compute_fingerprint(SPEC, ctx.cfg, {}) != ctx.fingerprint:  # another update committed since prepare
        raise StageError(f"ingest: the newest output of this config changed while this update started (now "
                         f"{base.fingerprint}); rerun `fm run ingest --update`")
    return base


SPEC = StageSpec(name="ingest", upstream=(), code_version="2", build=build, resumable=True,
                 fingerprint_extra=fingerprint_extra, superseded_by=newest_snapshot, plan_shards=shards.plan_shards,
                 run_shard=shards.run_shard)
