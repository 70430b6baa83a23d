"""The selection of an update: the crawl a from-scratch run would make of the server now, rebuilt from the
extended output's records and the update's answers, and journaled as the ledger's pages.

Per query, in config order, the candidates newest first (a from-scratch crawl's order):
  - above X (the query's `page=a<X>` walk start): exactly what that walk returned;
  - at or below X: what the server said now (order:change, id re-checks, offers), and the extended output's
    records of this query it said nothing about and no id re-check found gone, as Known records.
Selection (dedupe across queries, filters, md5 duplicates, quotas) is Ledger.select, so the journal, and the
tables assemble() writes from it, are those of a from-scratch crawl of the same server state. A query whose quota
now reaches below what the extended output had walks on (`page=b<id>`); the candidates a full query leaves unseen
are offered to the later queries (`<tags> id:...`), as a from-scratch crawl would let them take them.

A kill during the replay: the replay starts over from the journals (no request is sent twice, downloads already
journaled stay done); it is CPU work only.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from pipeline_config.ingest import IngestConfig
from tasks.ingest.api import DanbooruClient
from tasks.ingest.filters import PostFilter
from tasks.ingest.known import Known, KnownOutput
from tasks.ingest.ledger import Ledger
from tasks.ingest.parse import Post, to_int
from tasks.ingest.refresh import Refresh, Window, fetch_ids, walk_cursor

Candidate = tuple[int, "dict | Known"]  # (post id, raw record or Known)


def _id(raw: Any) -> int:
    return (to_int(raw.get("id")) if isinstance(raw, dict) else None) or 0


def candidates(qi: int, label: str, below: int, known: KnownOutput, refresh: Refresh,
               offered: dict[int, dict]) -> list[Candidate]:
    """The query's records newest first (see the module doc)."""
    fresh = {i: r for i, r in refresh.records(qi, "new").items() if i > below}
    said: dict[int, dict] = {}
    for kind in ("changes", "ids"):
        said.update({i: r for i, r in refresh.records(qi, kind).items() if i <= below})
    said.update({i: r for i, r in offered.items() if i <= below and i not in said})
    gone = refresh.gone(qi, "ids")
    out: list[Candidate] = [(i, r) for i, r in fresh.items()]
    out += [(i, r) for i, r in said.items() if i not in fresh]
    out += [(k.id, k) for k in known.of(label) if k.id <= below and k.id not in said and k.id not in gone]
    # records without an id (parse_error rejects, as a crawl writes them): the walk's; the known ones are below
    unkeyed = [(0, r) for page in refresh.pages.get((qi, "new"), []) for r in page if not _id(r)]
    out.sort(key=lambda c: -c[0])
    return out + unkeyed


def restart_if_partial(ledger: Ledger) -> bool:
    """A replay killed half-way is redone from the start (it is cheap); True when that was needed."""
    if not any(q.pages for q in ledger.queries) or all(q.done for q in ledger.queries):
        return False
    ledger.restart_pages()
    return True


async def replay(client: DanbooruClient, cfg: IngestConfig, plan: list[tuple[str, str, int]], known: KnownOutput,
                 window: Window, refresh: Refresh, ledger: Ledger, log: logging.Logger,
                 settle: Callable[[list[Post]], Any] | None = None) -> None:
    """Select every query's candidates into the ledger (no-op when an earlier attempt finished it); `settle`
    gets each journaled page's taken posts."""
    if restart_if_partial(ledger):
        log.info("ingest update: an earlier attempt stopped during the selection; redoing it from the journals")
    if all(q.done for q in ledger.queries):
        return
    sel = _Selector(client, cfg, plan, known, refresh, ledger, settle)
    unseen: list[tuple[int, list[int]]] = []  # (query, ids) that a full query left unseen
    for qi, (label, tags, _) in enumerate(plan):
        below = known.threshold(label, window.recent_since)
        offered: dict[int, dict] = {}
        for src, ids in unseen:  # what full earlier queries left: a from-scratch crawl would offer it here
            await fetch_ids(client, refresh, qi, f"offer{src}", label, tags, [i for i in ids if i <= below],
                            cfg.api.page_limit)
            offered.update(refresh.records(qi, f"offer{src}"))
        left = await sel.query(qi, candidates(qi, label, below, known, refresh, offered))
        if left:
            unseen.append((qi, left))


class _Selector:
    """Ledger.select over one query's candidates, page by page, journaled as the ledger's pages."""

    def __init__(self, client: DanbooruClient, cfg: IngestConfig, plan: list[tuple[str, str, int]],
                 known: KnownOutput, refresh: Refresh, ledger: Ledger,
                 settle: Callable[[list[Post]], Any] | None) -> None:
        self.client, self.cfg, self.plan, self.known, self.refresh, self.ledger = client, cfg, plan, known, refresh, ledger
        self.settle = settle
        self.quotas = [quota for _, _, quota in plan]
        self.filter = PostFilter(cfg.filters, need_file_url=True)
        self.limit = cfg.api.page_limit

    def _page(self, qi: int, records: list, param: str) -> bool:
        """Select and journal one page; True when it fills the query's quota (its last page)."""
        page, _ = self.ledger.select(((qi, rec) for rec in records), self.filter, self.cfg.legacy_ratings, self.quotas)
        full = self.ledger.queries[qi].accepted + len(page.accepted) >= self.quotas[qi]
        self.ledger.commit(page, q=qi, page_param=param, next_cursor=None, done=full, n=len(records))
        self._last_accepted = page.accepted[-1][1].id if page.accepted else None
        if self.settle is not None:
            self.settle([post for _, post in page.accepted])
        return full

    def _end(self, qi: int) -> None:
        self.ledger.commit(self.ledger.select([], self.filter, self.cfg.legacy_ratings, self.quotas)[0], q=qi,
                           page_param="update:end", next_cursor=None, done=True, n=0)

    async def query(self, qi: int, cands: list[Candidate]) -> list[int]:
        """Select one query; returns the ids a met quota left unseen (to offer to later queries)."""
        for start in range(0, len(cands), self.limit):
            chunk = cands[start:start + self.limit]
            if self._page(qi, [rec for _, rec in chunk], f"update:{start // self.limit + 1}"):
                cut = self._last_accepted or 0
                return [i for i, _ in cands[start:] if 0 < i < cut]
        label, tags, _ = self.plan[qi]
        if not self.known.quota_met.get(label):
            self._end(qi)  # the extended output saw the query to its end: nothing lies below its candidates
            return []
        # It had stopped at the quota, and the quota is not met now: walk on below, a page at a time.
        lowest = min((i for i, _ in cands if i), default=0)
        walk, k = self.refresh.walks[(qi, "older")], 0
        while True:
            pages = self.refresh.pages.get((qi, "older"), [])
            if k < len(pages):
                k += 1
                if self._page(qi, pages[k - 1], f"update:older:{k}"):
                    return []
            elif walk.done or not lowest:
                break
            else:
                await walk_cursor(self.client, self.refresh, qi, "older", label, tags, f"b{lowest}", self.limit,
                                  max_pages=1)
        self._end(qi)
        return []
