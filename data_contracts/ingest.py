"""Contract of the ingest stage: verified posts with full metadata, and rejects.

An output made by `fm run ingest --update` has the same tables (the whole dataset, as a from-scratch crawl of
the server at its snapshot would have them) and two more keys in its manifest's stats: `snapshot` (when its
view of the server was taken) and `update` (an UpdateRecord: what it extends, the re-check window, what was
added, changed and removed per query). They live in `stats` so that outputs made before updates existed stay
valid (a new manifest field would need a contract-version bump, which would invalidate every existing crawl).
"""
from __future__ import annotations

from datetime import datetime, timedelta

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from data_contracts.errors import ContractError
from data_contracts.manifest import StageManifest
from data_contracts.tables import REJECTS_SCHEMA

CONTRACT_VERSION = 1
STAGE = "ingest"

_tags = pa.list_(pa.string())
POSTS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("md5", pa.string(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
        pa.field("score", pa.int32()),
        pa.field("up_score", pa.int32()),
        pa.field("down_score", pa.int32()),
        pa.field("fav_count", pa.int32()),
        pa.field("rating", pa.string()),  # g / s / q / e (current meaning)
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("file_ext", pa.string()),
        pa.field("file_size", pa.int64()),
        pa.field("source", pa.string()),
        pa.field("parent_id", pa.int64()),
        pa.field("tags_general", _tags),
        pa.field("tags_character", _tags),
        pa.field("tags_copyright", _tags),
        pa.field("tags_artist", _tags),
        pa.field("tags_meta", _tags),
        pa.field("image_path", pa.string(), nullable=False),  # relative to the store's pool folder
        pa.field("query", pa.string()),  # the query that found it first
    ]
)
# id, reason, detail + the query that produced the post (empty for dump sources)
REJECTS = REJECTS_SCHEMA.append(pa.field("query", pa.string()))
SCHEMAS = {"posts": POSTS_SCHEMA, "rejects": REJECTS}


SNAPSHOT_KEY = "snapshot"  # stats key: UTC ISO time the crawl (or update) began, i.e. its view of the server
UPDATE_KEY = "update"  # stats key of an update output: an UpdateRecord


class QueryChanges(BaseModel):
    """What an update changed in one query's posts, against the output it extends."""

    model_config = ConfigDict(extra="forbid")
    added: int = 0  # posts of this query the extended output did not have as posts of this query
    changed: int = 0  # posts of both whose row differs (tags, rating, score, file, ...)
    unchanged: int = 0
    removed: dict[str, int] = Field(default_factory=dict)  # posts of the extended output no longer here, by reason
    # (a rejects reason code such as deleted / banned / excluded_tag, `other_query` when an earlier query took it
    # now, `gone` when the server no longer returns it for the query: expunged or retagged out of it)


class UpdateRecord(BaseModel):
    """stats["update"] of an output made by `fm run ingest --update`."""

    model_config = ConfigDict(extra="forbid")
    extends: str  # fingerprint of the ingest output this one extends
    lineage: str  # fingerprint of the from-scratch crawl the chain of updates started from
    base_snapshot: str  # the extended output's snapshot (UTC ISO)
    snapshot: str  # this update's view of the server (UTC ISO)
    changes_since: str  # order:change walks reached back to this updated_at
    recent_since: str  # posts uploaded since then were crawled again in full
    recheck_known: bool = False  # every older known post was re-fetched by id too
    complete: bool = True  # every change since base_snapshot was within reach (see notes when not)
    notes: list[str] = Field(default_factory=list)
    queries: dict[str, QueryChanges] = Field(default_factory=dict)
    removed_reasons: dict[str, int] = Field(default_factory=dict)  # over all queries
    images: dict[str, int] = Field(default_factory=dict)  # reused (md5 already in the pool) / downloaded
    requests: dict[str, int] = Field(default_factory=dict)  # /posts.json requests by kind (new, changes, ids, ...)


class IngestManifest(StageManifest):
    STAGE = STAGE
    CONTRACT_VERSION = CONTRACT_VERSION
    source: str  # danbooru_api | danbooru_dump
    queries: list[str] = []
    reject_reasons: dict[str, int] = {}

    def update_record(self) -> UpdateRecord | None:
        """The UpdateRecord of an output made by `--update`; None for a from-scratch crawl."""
        raw = self.stats.get(UPDATE_KEY)
        if raw is None:
            return None
        try:
            return UpdateRecord.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ContractError(f"ingest {self.fingerprint}: manifest stats.update.{'.'.join(map(str, first['loc']))}: "
                                f"{first['msg']}; rerun `fm run ingest --update --force`") from exc

    def snapshot(self) -> datetime:
        """When this output's view of the server was taken. Outputs made before snapshots were recorded: the
        commit time less the run's duration (when the crawl began)."""
        stamp = self.stats.get(SNAPSHOT_KEY)
        if stamp:
            return datetime.fromisoformat(stamp)
        seconds = float((self.stats.get("run") or {}).get("seconds") or 0.0)
        return datetime.fromisoformat(self.created_at) - timedelta(seconds=seconds)

    def lineage(self) -> str:
        """The from-scratch crawl this output descends from (itself for a from-scratch crawl)."""
        record = self.update_record()
        return record.lineage if record is not None else self.fingerprint
