"""`fm run ingest --update`: a new output extending the newest output of the same config (tasks/ingest/lineage.py)
with what changed on Danbooru since, equal to what a from-scratch crawl of the server now would write.

Three steps, each resumable after a kill with the house journals (journal/ of the work folder):
1. requests (tasks/ingest/refresh.py, journal/refresh.jsonl): per query the posts above the newest older known
   one (`page=a<id>`), the changes since the previous snapshot (`order:change`), known posts to ask again by id;
2. selection (tasks/ingest/replay.py, journal/pages.jsonl): the extended output's records and the answers, newest
   first per query, through the ledger's rules (dedupe, filters, md5 duplicates, quotas), as a crawl journals;
3. files: a taken post whose file is already in the pool (its md5 names it, the size is checked) is not fetched
   again; new posts and changed files are downloaded and verified as in a crawl (journal/downloads.jsonl).
Then assemble() writes the tables as for any crawl, and diff.py what changed against the extended output.
The window (the update's snapshot time, how far back changes and recent uploads are re-checked) is decided on the
first attempt and kept in journal/update.json, so a resumed update asks the server the same questions.
"""
from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable

from data_contracts.errors import StageError
from data_contracts.ingest import IngestManifest
from data_contracts.store import atomic_write_text
from pipeline_config.ingest import IngestConfig
from tasks.ingest.api import DanbooruClient
from tasks.ingest.crawl import download_posts, pending_error
from tasks.ingest.download import clean_incoming, pool_has
from tasks.ingest.embedded import served_by
from tasks.ingest.known import KnownOutput
from tasks.ingest.ledger import Ledger
from tasks.ingest.parse import Post
from tasks.ingest.refresh import Refresh, Window, fetch
from tasks.ingest.replay import replay

STATE = "update.json"  # in the journal folder: the window and the extended output, written once per update


def open_window(folder: Path, base: IngestManifest, cfg: IngestConfig) -> Window:
    """The update's window: from journal/update.json when an earlier attempt decided it, else decided now."""
    path = folder / STATE
    if path.exists():
        state = json.loads(path.read_text())
        if state.get("extends") != base.fingerprint:
            raise StageError(f"ingest update: {path} extends {state.get('extends')}, not {base.fingerprint}; remove "
                             "the work folder or rerun with --force")
        return Window(*(datetime.fromisoformat(state[k]) for k in ("snapshot", "changes_since", "recent_since")))
    now = datetime.now(timezone.utc)
    window = Window(snapshot=now, changes_since=base.snapshot() - timedelta(hours=cfg.update.overlap_hours),
                    recent_since=now - timedelta(days=cfg.update.recheck_days))
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"extends": base.fingerprint, "snapshot": window.snapshot.isoformat(),
                                        "changes_since": window.changes_since.isoformat(),
                                        "recent_since": window.recent_since.isoformat()}))
    return window


def settle_pooled(ledger: Ledger, pool: Path, posts: Iterable[Post] | None = None) -> int:
    """Journal the outcome of every taken post (of `posts`, default: all pending) whose verified file is already in
    the pool (its md5 names the file, the size is checked, as the downloader does before fetching): no download, no
    shard. Returns how many. A kept post carries no file URL (its record was not asked again): its file must be
    there."""
    settled = 0
    for post in list(posts if posts is not None else (p for _, p in ledger.pending.values())):
        if post.id not in ledger.pending:
            continue
        rel = pool_has(pool, post) if post.md5 and post.file_ext else None
        if rel is None and post.file_url is None:
            raise StageError(f"ingest update: the pool file of kept post {post.id} ({post.md5}) disappeared during "
                             "the update; rerun with `fm run ingest --update --force`")
        if rel is not None:
            ledger.record_outcome({"id": post.id, "md5": post.md5, "ok": True, "path": rel})
            settled += 1
    return settled


def file_counts(ledger: Ledger) -> dict[str, int]:
    """Over every attempt: taken posts whose file came from the pool (reused) and files fetched (downloaded)."""
    last: dict[int, dict] = {}
    for rec in ledger.download_records():
        last[int(rec["id"])] = rec
    return {"reused": sum(1 for r in last.values() if r["ok"] and not r.get("bytes")),
            "downloaded": sum(1 for r in last.values() if r.get("bytes"))}


async def run_update(cfg: IngestConfig, plan: list[tuple[str, str, int]], base_url: str, ledger: Ledger,
                     known: KnownOutput, window: Window, pool: Path, *, login: str | None, api_key: str | None,
                     log: logging.Logger, embedded: bool = False, download: bool = True) -> dict[str, Any]:
    """Steps 1-3 (3 without downloads when `download` is False: a sharded ingest downloads on its workers).
    Returns the run's figures for the report."""
    refresh = Refresh(ledger.pages.path.parent)
    try:
        async with DanbooruClient(cfg.api, base_url, login, api_key) as client:
            await fetch(client, cfg, plan, known, window, refresh, pool, log)
            # each selected page's posts with a file in the pool are settled at once: few posts wait in memory
            await replay(client, cfg, plan, known, window, refresh, ledger, log,
                         settle=lambda posts: settle_pooled(ledger, pool, posts))
            http = dict(client.stats)
        stats: dict[str, Any] = {"http": http, "throttle_429_pauses": client.page_throttle.penalties,
                                 "requests": dict(refresh.requests),
                                 "notes": sorted({w.note for w in refresh.walks.values() if w.note})}
    finally:
        refresh.close()
    settle_pooled(ledger, pool)  # what an earlier attempt selected but had not settled yet
    if not download:
        return stats
    todo = [post for _, post in ledger.pending.values()]
    clean_incoming(pool)
    if todo:
        got = await download_posts(cfg, base_url, [served_by(p, base_url) if embedded else p for p in todo],
                                   ledger.record_outcome, pool, login=login, api_key=api_key, log=log,
                                   deferred=ledger.deferred)
        stats["downloads"] = got["downloads"]
        stats["verify"] = got["verify"]
        for key, value in got["http"].items():
            stats["http"][key] = stats["http"].get(key, 0) + value
    if ledger.deferred:
        raise pending_error(ledger.deferred, len(ledger.outcome_ok))
    return stats
