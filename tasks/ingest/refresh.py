"""The requests of an update: what is new on Danbooru and what changed, journaled so that a kill costs none of
them again.

Per query, in config order (`fetch`):
  new      `page=a<X>` from X = the newest known post uploaded before the re-check window (known.threshold):
           every post the query returns above X, that is the new posts and the recent ones, in full;
  changes  `<tags> order:change` by page number until a page reaches updated_at < changes_since: the posts of
           the query whose tags, rating or deleted/banned status changed since the previous snapshot (posts
           retagged into the query too). Skipped, with a note, when the query has no room for `order:` under
           api.tag_limit: its older known posts are then re-fetched by id instead;
  ids      `<tags> id:a,b,...` in batches of api.page_limit: known posts to see again (known.recheck_ids). An asked
           id the server does not return is gone from the query (expunged, retagged out, or now excluded).
The replay asks two more kinds while it selects (tasks/ingest/replay.py): `older` (`page=b<id>`, a query whose
quota now reaches below what the extended output had) and `offer<k>` (`<tags> id:...`, posts a full query k
left unseen, offered to a later query).

Journal `journal/refresh.jsonl`, one line per answered request: {"q", "kind", "page" | "batch"+"asked", "next",
"done", "recs"} (recs: the raw records, so the replay parses them exactly as a crawl would), and {"q", "kind",
"plan"} for an id list decided once (it depends on the pool, which may change between attempts).
"""
from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from pipeline_config.ingest import IngestConfig, counted_tags
from tasks.common.journal import Journal
from tasks.ingest.api import DanbooruClient, FetchFailed, page_error
from tasks.ingest.known import KnownOutput
from tasks.ingest.parse import to_datetime, to_int

REFRESH = "refresh.jsonl"


@dataclass
class Window:
    """An update's view of time (journal/update.json; kept across attempts so a resume asks the same)."""

    snapshot: datetime  # when the update began: its view of the server
    changes_since: datetime  # order:change walks stop below this updated_at
    recent_since: datetime  # posts uploaded since then are crawled again in full


@dataclass
class Walk:
    next: Any = None
    done: bool = False
    pages: int = 0
    note: str = ""


class Refresh:
    """The answered requests of an update, replayed from the journal on open."""

    def __init__(self, folder: Path) -> None:
        self.journal = Journal(folder / REFRESH)
        self.walks: dict[tuple[int, str], Walk] = defaultdict(Walk)
        self.pages: dict[tuple[int, str], list[list[Any]]] = defaultdict(list)  # answers in order
        self.asked: dict[tuple[int, str], dict[int, list[int]]] = defaultdict(dict)  # batch -> ids asked
        self.plans: dict[tuple[int, str], list[int]] = {}
        self.requests: Counter = Counter()
        for rec in self.journal.records():
            self._apply(rec)

    def _apply(self, rec: dict[str, Any]) -> None:
        key = (int(rec["q"]), str(rec["kind"]))
        if "plan" in rec:
            self.plans[key] = [int(i) for i in rec["plan"]]
            return
        self.requests[key[1].rstrip("0123456789")] += 1
        self.pages[key].append(rec.get("recs") or [])
        if "batch" in rec:
            self.asked[key][int(rec["batch"])] = [int(i) for i in rec["asked"]]
        walk = self.walks[key]
        walk.next, walk.done, walk.pages = rec.get("next"), bool(rec.get("done")), walk.pages + 1
        walk.note = rec.get("note") or walk.note

    def add(self, rec: dict[str, Any]) -> None:
        """Journal an answer (fsync: it is a request not to send again), then apply it."""
        self.journal.append(rec, sync=True)
        self._apply(rec)

    def records(self, qi: int, kind: str) -> dict[int, dict]:
        """id -> raw record of every answer of this kind (a later answer of an id wins)."""
        out: dict[int, dict] = {}
        for page in self.pages.get((qi, kind), []):
            for raw in page:
                post_id = to_int(raw.get("id")) if isinstance(raw, dict) else None
                if post_id:
                    out[post_id] = raw
        return out

    def gone(self, qi: int, kind: str) -> set[int]:
        """Ids asked in batches of this kind that the server did not return."""
        asked = {i for ids in self.asked.get((qi, kind), {}).values() for i in ids}
        return asked - set(self.records(qi, kind))

    def plan(self, qi: int, kind: str, compute: Callable[[], list[int]]) -> list[int]:
        """An id list decided once per update (journaled), so that a resumed attempt asks the same batches."""
        if (qi, kind) not in self.plans:
            self.add({"q": qi, "kind": kind, "plan": compute()})
        return self.plans[(qi, kind)]

    def close(self) -> None:
        self.journal.close()


def has_room_for_order(tags: str, cfg: IngestConfig) -> bool:
    """Whether `<tags> order:change` stays within api.tag_limit (order: counts) and has no order: of its own."""
    return "order:" not in tags.lower() and len(counted_tags(tags)) + 1 <= cfg.api.tag_limit


def _ids(raws: list[Any]) -> list[int]:
    return [i for i in (to_int(r.get("id")) if isinstance(r, dict) else None for r in raws) if i]


async def walk_cursor(client: DanbooruClient, refresh: Refresh, qi: int, kind: str, label: str, tags: str,
                      start: str, limit: int, max_pages: int | None = None) -> None:
    """A cursor walk to its end (or `max_pages` more pages): `a<id>` upwards (each page the `limit` lowest ids
    above, so the next cursor is a<highest id>) or `b<id>` downwards; resumed from the journal."""
    walk = refresh.walks[(qi, kind)]
    cursor = walk.next if walk.pages else start
    sent = 0
    while not walk.done and (max_pages is None or sent < max_pages):
        sent += 1
        try:
            raws = await client.posts_page(tags, cursor, limit)
        except FetchFailed as exc:
            raise page_error(exc, label) from None
        ids = _ids(raws)
        if not ids:
            nxt = cursor
        elif cursor.startswith("a"):
            nxt = f"a{max(ids)}"
        else:
            nxt = f"b{min(ids)}"
        refresh.add({"q": qi, "kind": kind, "page": cursor, "next": nxt, "done": len(raws) < limit or not ids,
                     "recs": raws})
        cursor = nxt


async def walk_changes(client: DanbooruClient, refresh: Refresh, qi: int, label: str, tags: str, since: datetime,
                       limit: int, log: logging.Logger) -> None:
    """`<tags> order:change`, page 1, 2, ... until a page reaches a change older than `since` (or runs short)."""
    walk = refresh.walks[(qi, "changes")]
    page = int(walk.next) if walk.pages else 1
    search = f"{tags} order:change".strip()
    while not walk.done:
        try:
            raws = await client.posts_page(search, page, limit)
        except FetchFailed as exc:
            if exc.status != 410:
                raise page_error(exc, label) from None
            note = (f"order:change stopped at page {page} (the server's page cap): changes older than its last "
                    "page were not re-checked")
            log.warning("ingest update %r: %s", label, note)
            refresh.add({"q": qi, "kind": "changes", "page": page, "next": page, "done": True, "recs": [],
                         "note": note})
            break
        stamps = [s for s in (to_datetime(r.get("updated_at")) for r in raws if isinstance(r, dict)) if s]
        reached = bool(stamps) and min(stamps) < since
        refresh.add({"q": qi, "kind": "changes", "page": page, "next": page + 1,
                     "done": len(raws) < limit or reached or not raws, "recs": raws})
        page += 1


async def fetch_ids(client: DanbooruClient, refresh: Refresh, qi: int, kind: str, label: str, tags: str,
                    ids: list[int], limit: int) -> None:
    """`<tags> id:a,b,...` for `ids`, `limit` a request; batches answered before a kill are not asked again."""
    done = refresh.asked[(qi, kind)]
    for b, start in enumerate(range(0, len(ids), limit)):
        if b in done:
            continue
        batch = ids[start:start + limit]
        search = f"{tags} id:{','.join(map(str, batch))}".strip()
        try:
            raws = await client.posts_page(search, None, len(batch))
        except FetchFailed as exc:
            raise page_error(exc, label) from None
        refresh.add({"q": qi, "kind": kind, "batch": b, "asked": batch, "recs": raws})


async def fetch(client: DanbooruClient, cfg: IngestConfig, plan: list[tuple[str, str, int]], known: KnownOutput,
                window: Window, refresh: Refresh, pool: Path, log: logging.Logger) -> None:
    """Every request of the update that does not depend on the selection (see the module doc)."""
    limit = cfg.api.page_limit
    settings = cfg.update
    for qi, (label, tags, _) in enumerate(plan):
        below = known.threshold(label, window.recent_since)
        await walk_cursor(client, refresh, qi, "new", label, tags, f"a{below}", limit)
        room = has_room_for_order(tags, cfg)
        if room:
            await walk_changes(client, refresh, qi, label, tags, window.changes_since, limit, log)
        elif not refresh.walks[(qi, "changes")].done:
            note = (f"no room for order:change in {tags!r} under api.tag_limit {cfg.api.tag_limit}: its older known "
                    "posts were re-fetched by id instead (posts retagged into the query are not seen)")
            log.warning("ingest update %r: %s", label, note)
            refresh.add({"q": qi, "kind": "changes", "page": 0, "next": 0, "done": True, "recs": [], "note": note})
        said = refresh.records(qi, "changes")  # the changed posts, and the rest of the walk's last page
        ids = refresh.plan(qi, "ids-plan", lambda: known.recheck_ids(
            label, below, pool, everything=settings.recheck_known or not room, exclude=set(said)))
        await fetch_ids(client, refresh, qi, "ids", label, tags, ids, limit)
        changed = sum(1 for raw in said.values() if (to_datetime(raw.get("updated_at")) or window.snapshot)
                      >= window.changes_since)
        log.info("ingest update %r: %d posts above id %d (new, and recent in full), %d changed since %s, %d "
                 "re-checked by id", label, len(refresh.records(qi, "new")), below, changed,
                 window.changes_since.isoformat(timespec="seconds"), len(ids))
