"""The output an update extends, as the update reads it: per query, the posts and rejects it holds.

Each record is a `Known`: an accepted post (rebuilt from its posts.parquet row, with the pool path of its
verified file) or a reject (reason + detail). The update replays a Known record unchanged unless the server told
it otherwise (tasks/ingest/replay.py); this module also says which known records must be asked again by id
(`recheck_ids`): download failures (a from-scratch crawl would try again), md5 duplicates (their owner may be
gone), posts whose pool file is missing. The tables stay in Arrow; Known records are built one query at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc

from data_contracts.ingest import POSTS_SCHEMA, REJECTS, IngestManifest
from data_contracts.store import ArtifactStore
from data_contracts.tables import read_table
from tasks.ingest.parse import CATEGORIES, Post

# Reject reasons decided by the record alone under the same config (filters.py, parse.py): replayed as they
# are. Every other reason (duplicate_md5, download and verify failures) is asked again.
METADATA_REASONS = frozenset({"parse_error", "deleted", "banned", "restricted", "unsupported_ext", "too_small",
                              "rating", "low_score", "excluded_tag", "out_of_range"})
_POST_FIELDS = ("id", "md5", "created_at", "score", "up_score", "down_score", "fav_count", "rating", "width",
                "height", "file_ext", "file_size", "source", "parent_id")


@dataclass(frozen=True)
class Known:
    """A record of the extended output, replayed without its raw record. post: an accepted post (its filters
    passed under the same config: only the md5 dedupe applies again); reject: (reason, detail)."""

    id: int
    post: Post | None = None
    reject: tuple[str, str] | None = None
    image_path: str = ""


class KnownOutput:
    """The extended output's posts and rejects, by query label."""

    def __init__(self, store: ArtifactStore, manifest: IngestManifest) -> None:
        self.manifest = manifest
        where = f"ingest/{manifest.fingerprint}"
        self.posts = read_table(store.path(manifest, "posts.parquet"), POSTS_SCHEMA, f"{where}/posts.parquet")
        self.rejects = read_table(store.path(manifest, "rejects.parquet"), REJECTS, f"{where}/rejects.parquet")
        self.quota_met = {row["query"]: bool(row.get("quota_met")) for row in manifest.stats.get("per_query", [])}

    def _of(self, table: pa.Table, label: str) -> pa.Table:
        return table.filter(pc.equal(pc.fill_null(table["query"], ""), label))

    def of(self, label: str) -> list[Known]:
        """The query's known records (built on each call: one query's worth at a time)."""
        posts = self._of(self.posts, label)
        out = [Known(row["id"], post=_post_of(row), image_path=row["image_path"]) for row in posts.to_pylist()]
        rejects = self._of(self.rejects, label).select(["id", "reason", "detail"]).to_pylist()
        return out + [Known(r["id"], reject=(r["reason"], r["detail"] or "")) for r in rejects]

    def threshold(self, label: str, recent_since: datetime) -> int:
        """The id the query's `page=a<id>` walk starts above: the newest known post uploaded before the window
        (0: every known post of the query is recent, so the whole query is walked again)."""
        posts = self._of(self.posts, label)
        older = posts.filter(pc.less(posts["created_at"], pa.scalar(recent_since, posts.schema.field("created_at")
                                                                    .type)))
        return int(pc.max(older["id"]).as_py() or 0) if older.num_rows else 0

    def recheck_ids(self, label: str, below: int, pool: Path, everything: bool, exclude: Iterable[int] = ()
                    ) -> list[int]:
        """Known ids <= `below` to ask the server again (ascending): see the module doc; `everything`: all of them
        (recheck_known, or a query with no room for order:change)."""
        skip = set(exclude)
        out: set[int] = set()
        for row in self._of(self.rejects, label).select(["id", "reason"]).to_pylist():
            if 0 < row["id"] <= below and row["id"] not in skip and (everything or row["reason"] not in
                                                                      METADATA_REASONS):
                out.add(row["id"])
        posts = self._of(self.posts, label).select(["id", "md5", "file_ext", "file_size", "image_path"])
        for row in posts.to_pylist():
            if row["id"] <= below and row["id"] not in skip and (everything or not _pool_holds(pool, row)):
                out.add(row["id"])
        return sorted(out)


def _pool_holds(pool: Path, row: dict) -> bool:
    # the download module's check: the same size rule, object stores too
    from tasks.ingest.download import pool_has

    probe = Post(id=row["id"], md5=row["md5"], created_at=None, score=None, up_score=None, down_score=None,
                 fav_count=None, rating=None, width=None, height=None, file_ext=row["file_ext"],
                 file_size=row["file_size"], source=None, parent_id=None, tags_general=(), tags_character=(),
                 tags_copyright=(), tags_artist=(), tags_meta=(), file_url=None, is_deleted=False, is_banned=False,
                 is_pending=False, is_flagged=False)
    return pool_has(pool, probe) == row["image_path"]


def _post_of(row: dict) -> Post:
    """A posts.parquet row as the Post the crawl had taken (no file URL: its file is already in the pool)."""
    fields = {name: row[name] for name in _POST_FIELDS}
    for cat in CATEGORIES:
        fields[f"tags_{cat}"] = tuple(row[f"tags_{cat}"] or ())
    return Post(**fields, file_url=None, is_deleted=False, is_banned=False, is_pending=False, is_flagged=False)
