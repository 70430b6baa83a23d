"""The `danbooru_api` source: crawl every query with cursor paging while downloads run concurrently.

Queries run one after another, in config order, newest posts first (first page without `page`, then
`page=b<lowest id seen>`), until a short page or the query's quota. Each page is parsed, deduped, filtered
and journaled before its posts go on a bounded download queue; `api.concurrency` workers download and
verify. The bounded queue is the back-pressure that keeps memory flat: the crawl waits when downloads lag.
After a kill, the ledger replays the journals: cursors resume, unfinished downloads are queued first.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import Counter
from typing import Callable

from data_contracts.errors import StageError
from pipeline_config.ingest import IngestConfig
from pipeline_config.secrets import redact
from tasks.ingest.api import DanbooruClient, FetchFailed, page_error
from tasks.ingest.download import Downloader, Outcome, clean_incoming, outcome_json
from tasks.ingest.embedded import served_by
from tasks.ingest.filters import PostFilter
from tasks.ingest.ledger import Ledger
from tasks.ingest.parse import Post, to_int
from tasks.ingest.verify import ProcessVerifier, make_verifier

ProgressFn = Callable[[float, str], None]


def query_plan(cfg: IngestConfig) -> list[tuple[str, str, int]]:
    """(label, tags, quota) per query; no queries = everything (embedded server and dumps only)."""
    if cfg.queries:
        return [(q.label, q.tags, q.quota) for q in cfg.queries]
    return [("(all posts)", "", 2**62)]


def verify_workers(cfg: IngestConfig) -> int:
    return cfg.verify.workers or max(1, os.cpu_count() or 1)


class _Progress:
    def __init__(self, fn: ProgressFn, ledger: Ledger, quota_total: int) -> None:
        self.fn, self.ledger, self.quota_total = fn, ledger, quota_total
        self.last = 0.0

    def __call__(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < 1.0:
            return
        self.last = now
        taken = sum(q.accepted for q in self.ledger.queries)
        done = len(self.ledger.outcome_ok)
        crawling = not all(q.done for q in self.ledger.queries)
        total = max(self.quota_total if crawling else taken, taken, 1)
        self.fn(min(0.99, done / total), f"{done} files done, {taken} posts taken")


def pending_error(failures: dict[int, tuple[str, str]], finished: int) -> StageError:
    """The message for downloads that failed for transient reasons only: nothing is committed, a rerun retries."""
    by_reason = Counter(reason for reason, _ in failures.values())
    post_id, (reason, detail) = min(failures.items())
    return StageError(redact(
        f"ingest: {len(failures)} post(s) could not be downloaded for now "
        f"({', '.join(f'{r} {n}' for r, n in by_reason.most_common())}; e.g. post {post_id}: {detail}). "
        f"Transient failures are never written off as rejects, so nothing was committed; the {finished} finished "
        "download(s) are kept. Rerun `fm run ingest` to retry the rest (check the network, the server, or "
        "lower ingest.api.concurrency / requests_per_s if the server is overloaded)"))


def settle(ledger: Ledger, post: Post, outcome: Outcome, log: logging.Logger) -> None:
    """Journal a final outcome; keep a transient failure pending (a rerun retries it)."""
    if outcome.transient:
        ledger.defer(post.id, outcome.reason, outcome.detail)
        log.debug("post %s: %s, left pending for a rerun", post.id, outcome.reason)
        return
    ledger.record_outcome(outcome_json(post.id, post.md5, outcome))
    if not outcome.ok:
        log.debug("post %s rejected: %s %s", post.id, outcome.reason, redact(outcome.detail))


async def crawl_api(cfg: IngestConfig, base_url: str, ledger: Ledger, pool, *, login: str | None,
                    api_key: str | None, progress: ProgressFn, log: logging.Logger, embedded: bool = False) -> dict:
    """Run the crawl + downloads to completion (or raise StageError); returns client/downloader stats.

    embedded: the mini-booru serves the files on this run's port, so posts journaled by an earlier run (another
    port) are re-pointed here before their download."""
    plan = query_plan(cfg)
    quotas = [quota for _, _, quota in plan]
    post_filter = PostFilter(cfg.filters, need_file_url=True)
    clean_incoming(pool)
    report = _Progress(progress, ledger, sum(min(q, 10**9) for q in quotas))
    queue: asyncio.Queue[tuple[int, Post] | None] = asyncio.Queue(maxsize=cfg.api.concurrency * 4)
    verifier = make_verifier(cfg.verify.mode, verify_workers(cfg))
    t_start = time.monotonic()
    try:
        await verifier.start()
        t_crawl = time.monotonic()
        async with DanbooruClient(cfg.api, base_url, login, api_key) as client:
            downloader = Downloader(client, pool, verifier, max_pixels=cfg.verify.max_pixels,
                                    content_retries=cfg.api.content_retries)

            async def worker() -> None:
                while True:
                    item = await queue.get()
                    if item is None:
                        return
                    _, post = item
                    outcome = await downloader.download(served_by(post, base_url) if embedded else post)
                    settle(ledger, post, outcome, log)
                    report()

            async def crawler() -> None:
                for item in list(ledger.pending.values()):  # unfinished downloads of the last run first
                    await queue.put(item)
                for qi, (label, tags, quota) in enumerate(plan):
                    await _crawl_query(client, ledger, qi, label, tags, quotas, post_filter, cfg, queue, log)
                    report()
                for _ in range(cfg.api.concurrency):
                    await queue.put(None)

            tasks = [asyncio.create_task(crawler(), name="crawler")]
            tasks += [asyncio.create_task(worker(), name=f"download-{i}") for i in range(cfg.api.concurrency)]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    if task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            report(force=True)
            if ledger.deferred:
                raise pending_error(ledger.deferred, len(ledger.outcome_ok))
            peak = verifier.peak_rss_mib() if isinstance(verifier, ProcessVerifier) else None
            return {
                "http": dict(client.stats),
                "throttle_429_pauses": client.page_throttle.penalties,
                "downloads": {k: round(v, 3) if isinstance(v, float) else v for k, v in downloader.stats.items()},
                "verify": {"mode": cfg.verify.mode, "workers": verify_workers(cfg), "crashes": verifier.crashes,
                           "worker_peak_rss_mib": round(peak, 1) if peak else None,
                           "start_seconds": round(t_crawl - t_start, 2)},
                "crawl_seconds": round(time.monotonic() - t_crawl, 2),  # pages + downloads + verification
            }
    finally:
        await verifier.close()


async def _crawl_query(client: DanbooruClient, ledger: Ledger, qi: int, label: str, tags: str, quotas: list[int],
                       post_filter: PostFilter, cfg: IngestConfig, queue: asyncio.Queue | None, log: logging.Logger) -> None:
    state = ledger.queries[qi]
    limit = cfg.api.page_limit
    while not state.done:
        if state.accepted >= quotas[qi]:
            ledger.commit(ledger.select([], post_filter, cfg.legacy_ratings, quotas)[0], q=qi,
                          page_param=state.cursor, next_cursor=state.cursor, done=True, n=0)
            break
        page_param = state.cursor
        try:
            raws = await client.posts_page(tags, page_param, limit)
        except FetchFailed as exc:
            if exc.status == 410:  # beyond the page cap: nothing more to get for this query
                ledger.commit(ledger.select([], post_filter, cfg.legacy_ratings, quotas)[0], q=qi,
                              page_param=page_param, next_cursor=page_param, done=True, n=0,
                              extra={"note": "page cap reached (410)"})
                log.warning("ingest query %r: the server refused further pages (410)", label)
                break
            raise page_error(exc, label) from None
        page, _ = ledger.select(((qi, raw) for raw in raws), post_filter, cfg.legacy_ratings, quotas)
        ids = [i for i in (_raw_id(r) for r in raws) if i]
        next_cursor = f"b{min(ids)}" if ids else page_param
        full = state.accepted + len(page.accepted) >= quotas[qi]
        done = full or len(raws) < limit or not ids
        ledger.commit(page, q=qi, page_param=page_param, next_cursor=next_cursor, done=done, n=len(raws))
        log.info("ingest %r page %s: %d posts, %d taken, %d rejected, %d duplicates%s", label,
                 page_param or "1", len(raws), len(page.accepted), len(page.rejects), page.duplicates,
                 " (quota met)" if full else "")
        if queue is not None:  # None: the metadata pass of a sharded ingest (downloads come later)
            for item in page.accepted:
                await queue.put(item)


async def crawl_metadata(cfg: IngestConfig, base_url: str, ledger: Ledger, *, login: str | None,
                         api_key: str | None, log: logging.Logger) -> dict:
    """Crawl every query's pages to the end without downloading (the first half of a sharded ingest).

    A rerun resumes from the journalled cursors; a finished crawl costs no request.
    """
    plan = query_plan(cfg)
    quotas = [quota for _, _, quota in plan]
    post_filter = PostFilter(cfg.filters, need_file_url=True)
    t_crawl = time.monotonic()
    async with DanbooruClient(cfg.api, base_url, login, api_key) as client:
        for qi, (label, tags, _) in enumerate(plan):
            await _crawl_query(client, ledger, qi, label, tags, quotas, post_filter, cfg, None, log)
        return {"http": dict(client.stats), "throttle_429_pauses": client.page_throttle.penalties,
                "crawl_seconds": round(time.monotonic() - t_crawl, 2)}


async def download_posts(cfg: IngestConfig, base_url: str, posts: list[Post], record: Callable[[dict], None],
                         pool, *, login: str | None, api_key: str | None, log: logging.Logger,
                         verify_mode: str | None = None, deferred: dict[int, tuple[str, str]] | None = None) -> dict:
    """Download and verify `posts` into the pool, `api.concurrency` at a time; record(outcome) for each final
    outcome. Transient failures are not recorded: they land in `deferred` (id -> (reason, detail))."""
    deferred = {} if deferred is None else deferred
    queue: asyncio.Queue[Post | None] = asyncio.Queue()
    for post in posts:
        queue.put_nowait(post)
    for _ in range(cfg.api.concurrency):
        queue.put_nowait(None)
    mode = verify_mode or cfg.verify.mode
    verifier = make_verifier(mode, verify_workers(cfg))
    clean_incoming(pool)
    started = time.monotonic()
    try:
        await verifier.start()
        async with DanbooruClient(cfg.api, base_url, login, api_key) as client:
            downloader = Downloader(client, pool, verifier, max_pixels=cfg.verify.max_pixels,
                                    content_retries=cfg.api.content_retries)

            async def worker() -> None:
                while (post := await queue.get()) is not None:
                    outcome = await downloader.download(post)
                    if outcome.transient:  # not journaled: the shard stays unfinished, a rerun retries it
                        deferred[post.id] = (outcome.reason, outcome.detail)
                        continue
                    record(outcome_json(post.id, post.md5, outcome))
                    if not outcome.ok:
                        log.debug("post %s rejected: %s %s", post.id, outcome.reason, redact(outcome.detail))

            await asyncio.gather(*(worker() for _ in range(cfg.api.concurrency)))
            return {"http": dict(client.stats),
                    "downloads": {k: round(v, 3) if isinstance(v, float) else v for k, v in downloader.stats.items()},
                    "verify": {"mode": mode, "workers": verify_workers(cfg), "crashes": verifier.crashes},
                    "download_seconds": round(time.monotonic() - started, 2)}
    finally:
        await verifier.close()


def _raw_id(raw: object) -> int | None:
    return to_int(raw.get("id")) if isinstance(raw, dict) else None


def run_async(coro):
    """asyncio.run, also from a thread that already runs an event loop (e.g. inside a flow runner)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    result: dict = {}

    def target() -> None:
        try:
            result["value"] = asyncio.run(coro)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=target, name="ingest-loop")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]
