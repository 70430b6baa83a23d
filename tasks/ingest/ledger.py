"""The crawl's memory: which posts were taken or rejected, per-query cursors, finished downloads.

Two journals in the stage's work folder (kept across kills):
    journal/pages.jsonl      one record per processed page (API) or batch (dump), written BEFORE its posts are
                             queued for download: {"q", "page", "next", "done", "n", "dup", "acc": [[q, post]],
                             "rej": [[q, id, reason, detail]]}
    journal/downloads.jsonl  one record per finished post file: {"id", "md5", "ok", "path" | "reason"+"detail"}
    journal/shard-<k>.downloads.jsonl  the same records, written by download shard k under a Dask/Ray runner
                             (tasks/ingest/shards.py): one file per shard, so workers never share a file
Replaying both gives back the dedupe sets, each query's cursor and quota count, and the accepted posts
whose download had not finished — nothing else needs to survive a kill. Memory: ids, md5s and counters
only (no post bodies except the few pending downloads).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from tasks.common.journal import Journal, read_records
from tasks.ingest.filters import PostFilter, Reject
from tasks.ingest.known import Known
from tasks.ingest.parse import ParseError, Post, parse_post, to_int
from tasks.ingest.reasons import is_transient


@dataclass
class QueryState:
    cursor: Any = None  # API: the next `page` value (None = first page); dump: the next record offset
    done: bool = False
    accepted: int = 0
    pages: int = 0
    fetched: int = 0  # records seen on this query's pages
    duplicates: int = 0  # already taken/rejected by an earlier query or page
    rejected: Counter = field(default_factory=Counter)  # metadata rejects by reason
    note: str = ""


@dataclass
class Page:
    """The outcome of one page before it is journaled."""

    accepted: list[tuple[int, Post]] = field(default_factory=list)
    rejects: list[tuple[int, int, str, str]] = field(default_factory=list)  # (q, id, reason, detail)
    duplicates: int = 0
    dup_by_q: Counter = field(default_factory=Counter)


SHARD_DOWNLOADS = "shard-{}-{:05d}.downloads.jsonl"  # shard size, shard index


def shard_download_journals(folder: Path) -> list[Path]:
    """The download journals of the shards, in shard order."""
    return sorted(folder.glob("shard-*.downloads.jsonl"))


def is_final(record: Mapping[str, Any]) -> bool:
    """Whether a download record settles its post (journals of older versions also hold transient failures)."""
    return bool(record["ok"]) or not is_transient(str(record.get("reason", "")))


class Ledger:
    def __init__(self, folder: Path, n_queries: int, keep_pending: bool = True) -> None:
        """keep_pending=False: no post bodies in memory (a sharded ingest reads them back from the journal)."""
        self.keep_pending = keep_pending
        self.pages = Journal(folder / "pages.jsonl")
        self.downloads = Journal(folder / "downloads.jsonl")
        self.queries = [QueryState() for _ in range(max(n_queries, 1))]
        self.seen_ids: set[int] = set()
        self.md5_owner: dict[str, int] = {}
        self.outcome_ok: dict[int, bool] = {}
        self.pending: dict[int, tuple[int, Post]] = {}  # accepted, download not finished: id -> (q, post)
        # Posts of this run whose download failed for a transient reason (still pending): id -> (reason, detail)
        self.deferred: dict[int, tuple[str, str]] = {}
        self.dump_offset = 0
        self.dump_done = False
        self._replay()

    def restart_pages(self) -> None:
        """Forget every page (an update's selection starts over); finished downloads stay journaled."""
        folder, n = self.pages.path.parent, len(self.queries)
        self.close()
        self.pages.path.unlink(missing_ok=True)
        self.__init__(folder, n, self.keep_pending)  # type: ignore[misc]

    # --- replay ----------------------------------------------------------------------------------------
    def _replay(self) -> None:
        for rec in self.download_records():
            if is_final(rec):
                self.outcome_ok[int(rec["id"])] = bool(rec["ok"])
        for rec in self.pages.records():
            self._apply(rec, replay=True)

    def _apply(self, rec: Mapping[str, Any], replay: bool, posts: list[tuple[int, Post]] | None = None) -> None:
        q = rec.get("q")
        if q is not None:
            state = self.queries[q]
            state.cursor = rec.get("next")
            state.done = bool(rec.get("done"))
            state.pages += 1
            state.fetched += int(rec.get("n", 0))
            state.duplicates += int(rec.get("dup", 0))
            if rec.get("note"):
                state.note = rec["note"]
        else:  # a dump batch: per-record query indices, one global offset
            self.dump_offset = int(rec.get("next") or 0)
            self.dump_done = bool(rec.get("done"))
            for qi, n in (rec.get("seen_by_q") or {}).items():
                self.queries[int(qi)].fetched += int(n)
            for qi, n in (rec.get("dup_by_q") or {}).items():
                self.queries[int(qi)].duplicates += int(n)
        entries = posts if posts is not None else [(qi, Post.from_json(p)) for qi, p in rec.get("acc", [])]
        for qi, post in entries:
            self.queries[qi].accepted += 1
            self.seen_ids.add(post.id)
            if post.md5:
                self.md5_owner.setdefault(post.md5, post.id)
            if self.keep_pending and post.id not in self.outcome_ok:
                self.pending[post.id] = (qi, post)
        for qi, post_id, reason, _detail in rec.get("rej", []):
            self.queries[qi].rejected[reason] += 1
            if post_id:
                self.seen_ids.add(int(post_id))

    # --- selection ---------------------------------------------------------------------------------------
    def select(self, records: Iterable[tuple[int, Mapping[str, Any] | Known]], post_filter: PostFilter,
               legacy_ratings: str, quotas: list[int]) -> tuple[Page, int]:
        """Parse, dedupe, filter and count (query index, raw record) pairs against the quotas (a Known record of
        the output an update extends instead of a raw one: see tasks/ingest/known.py).

        Does not change the ledger (commit() does, after the journal write). Records of a query whose quota
        is already met are skipped without being marked seen (a later query may take them). Returns the page
        and the number of records read.
        """
        page = Page()
        seen: set[int] = set()
        md5s: dict[str, int] = {}
        taken = Counter()
        consumed = 0
        for qi, raw in records:
            consumed += 1
            if self.queries[qi].accepted + taken[qi] >= quotas[qi]:
                continue  # this query is full; the record stays unseen for later queries
            if isinstance(raw, Known):  # an update replays a record of the output it extends (tasks/ingest/known.py)
                post = raw.post
                if post is None:  # a metadata reject: the same reason, unless another query had it first
                    if raw.id and (raw.id in self.seen_ids or raw.id in seen):
                        page.duplicates += 1
                        page.dup_by_q[qi] += 1
                    else:
                        seen.add(raw.id)
                        page.rejects.append((qi, raw.id, *raw.reject))  # type: ignore[misc]
                    continue
            else:
                try:
                    post = parse_post(raw, legacy_ratings)
                except ParseError as exc:
                    raw_id = (to_int(raw.get("id")) if isinstance(raw, Mapping) else None) or 0
                    page.rejects.append((qi, raw_id, "parse_error", str(exc)))
                    continue
            if post.id in self.seen_ids or post.id in seen:
                page.duplicates += 1
                page.dup_by_q[qi] += 1
                continue
            seen.add(post.id)
            # A known post passed the filters before, under the same config; only the md5 dedupe applies again.
            reject = None if isinstance(raw, Known) else post_filter.check(post)
            if reject is None and post.md5 is not None:
                owner = self.md5_owner.get(post.md5) or md5s.get(post.md5)
                if owner is not None:
                    reject = Reject("duplicate_md5", f"same file as post {owner}")
            if reject is not None:
                page.rejects.append((qi, post.id, reject.reason, reject.detail))
                continue
            md5s[post.md5] = post.id  # type: ignore[index]
            taken[qi] += 1
            page.accepted.append((qi, post))
        return page, consumed

    def commit(self, page: Page, *, q: int | None, page_param: Any, next_cursor: Any, done: bool, n: int,
               extra: dict[str, Any] | None = None) -> None:
        """Journal the page (fsync: it is the expensive part to redo), then apply it in memory."""
        rec: dict[str, Any] = {
            "q": q, "page": page_param, "next": next_cursor, "done": done, "n": n, "dup": page.duplicates,
            "acc": [[qi, post.to_json()] for qi, post in page.accepted],
            "rej": [list(r) for r in page.rejects],
            **(extra or {}),
        }
        self.pages.append(rec, sync=True)
        self._apply(rec, replay=False, posts=page.accepted)

    def record_outcome(self, record: dict[str, Any]) -> None:
        """A final outcome (downloaded, or rejected for a reason that is a fact about the post): journaled."""
        self.downloads.append(record)
        post_id = int(record["id"])
        self.outcome_ok[post_id] = bool(record["ok"])
        self.pending.pop(post_id, None)
        self.deferred.pop(post_id, None)

    def defer(self, post_id: int, reason: str, detail: str) -> None:
        """A transient failure: not journaled, the post stays pending for the next attempt."""
        self.deferred[post_id] = (reason, detail)

    # --- reading back ------------------------------------------------------------------------------------
    def taken(self) -> Iterator[tuple[int, Post]]:
        """Every accepted post in crawl order (streamed from the journal)."""
        for rec in self.pages.records():
            for qi, post in rec.get("acc", []):
                yield qi, Post.from_json(post)

    def metadata_rejects(self) -> Iterator[tuple[int, int, str, str]]:
        for rec in self.pages.records():
            for qi, post_id, reason, detail in rec.get("rej", []):
                yield qi, int(post_id or 0), reason, detail

    def download_records(self) -> Iterator[dict[str, Any]]:
        """Every final download outcome: this process's journal, then each shard's (a later record of an id
        wins)."""
        yield from filter(is_final, self.downloads.records())
        for path in shard_download_journals(self.downloads.path.parent):
            yield from filter(is_final, read_records(path))

    def close(self) -> None:
        self.pages.close()
        self.downloads.close()
