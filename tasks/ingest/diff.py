"""What an update changed: its tables against the extended output's, per query (the manifest's UpdateRecord and
the report's update section)."""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa

from data_contracts.ingest import (
    POSTS_SCHEMA,
    REJECTS,
    IngestManifest,
    QueryChanges,
    UpdateRecord,
)
from data_contracts.store import ArtifactStore
from data_contracts.tables import read_table
from tasks.ingest.refresh import Window

MAX_LISTED = 500  # rows of the report's added / removed tables
BATCH = 4096  # rows made Python objects at a time


def _rows(table: pa.Table) -> dict[int, tuple[str, str]]:
    """id -> (query, digest of the whole row), a batch at a time (a dataset's rows never all as Python objects)."""
    out: dict[int, tuple[str, str]] = {}
    for batch in table.to_batches(max_chunksize=BATCH):
        for row in batch.to_pylist():
            text = json.dumps(row, sort_keys=True, default=str, separators=(",", ":"))
            out[row["id"]] = (row["query"] or "", hashlib.blake2b(text.encode(), digest_size=16).hexdigest())
    return out


def compare(store: ArtifactStore, base: IngestManifest, work: Path, labels: list[str]
            ) -> tuple[dict[str, QueryChanges], list[dict[str, Any]], list[dict[str, Any]]]:
    """(changes per query, added rows, removed rows) of the tables in `work` against `base`'s."""
    old = _rows(read_table(store.path(base, "posts.parquet"), POSTS_SCHEMA))
    new = _rows(read_table(work / "posts.parquet", POSTS_SCHEMA))
    rejected = {row["id"]: row for row in read_table(work / "rejects.parquet", REJECTS,
                                                     columns=["id", "reason", "detail"]).to_pylist()}
    changes = {label: QueryChanges() for label in labels}
    added, removed = [], []
    for post_id, (query, digest) in new.items():
        was = old.get(post_id)
        entry = changes.setdefault(query, QueryChanges())
        if was is None or was[0] != query:
            entry.added += 1
            added.append({"id": post_id, "query": query, "was": "" if was is None else f"in {was[0]}"})
        elif was[1] != digest:
            entry.changed += 1
        else:
            entry.unchanged += 1
    for post_id, (query, _) in old.items():
        row = new.get(post_id)
        if row is not None and row[0] == query:
            continue
        if row is not None:
            reason, detail = "other_query", f"taken by {row[0]}"
        elif post_id in rejected:
            reason, detail = rejected[post_id]["reason"], rejected[post_id]["detail"] or ""
        else:
            reason, detail = "gone", "no longer returned for the query (expunged, or retagged out of it)"
        entry = changes.setdefault(query, QueryChanges())
        entry.removed[reason] = entry.removed.get(reason, 0) + 1
        removed.append({"id": post_id, "query": query, "reason": reason, "detail": detail})
    return changes, added, removed


def record(store: ArtifactStore, base: IngestManifest, work: Path, labels: list[str], window: Window,
           settings: dict[str, Any], run: dict[str, Any], files: dict[str, int]
           ) -> tuple[UpdateRecord, dict[str, list[dict]], str]:
    """The UpdateRecord, the report's tables and its summary section (files: update.file_counts)."""
    changes, added, removed = compare(store, base, work, labels)
    reasons = Counter(r["reason"] for r in removed)
    notes = list(run.get("notes") or [])
    rec = UpdateRecord(
        extends=base.fingerprint, lineage=base.lineage(), base_snapshot=base.snapshot().isoformat(),
        snapshot=window.snapshot.isoformat(), changes_since=window.changes_since.isoformat(),
        recent_since=window.recent_since.isoformat(), recheck_known=bool(settings.get("recheck_known")),
        complete=not notes, notes=notes, queries=changes, removed_reasons=dict(reasons.most_common()),
        images=dict(files),
        requests={k: int(v) for k, v in sorted((run.get("requests") or {}).items())})
    tables = {
        "update_per_query": [{"query": q, "added": c.added, "changed": c.changed, "unchanged": c.unchanged,
                              "removed": sum(c.removed.values()),
                              "removed_by_reason": ", ".join(f"{r} {n}" for r, n in sorted(c.removed.items()))}
                             for q, c in changes.items()],
        "update_added": added[:MAX_LISTED],
        "update_removed": sorted(removed, key=lambda r: (r["reason"], r["id"]))[:MAX_LISTED],
    }
    n_changed = sum(c.changed for c in changes.values())
    lines = ["", f"### Update of `{base.fingerprint}` (snapshot {_short(rec.base_snapshot)} -> {_short(rec.snapshot)})",
             "", f"+{len(added)} added, {n_changed} changed, -{len(removed)} removed"
             + (f" ({', '.join(f'{r} {n}' for r, n in reasons.most_common())})" if removed else "")
             + f"; files: {rec.images['reused']} reused from the pool, {rec.images['downloaded']} downloaded.",
             f"Re-checked: changes since {_short(rec.changes_since)} (order:change), uploads since "
             f"{_short(rec.recent_since)} in full" + (", every older post by id" if rec.recheck_known else "")
             + f"; {sum(rec.requests.values())} requests ({', '.join(f'{k} {v}' for k, v in rec.requests.items())})."]
    lines += [f"**Note:** {note}" for note in notes]
    return rec, tables, "\n".join(lines) + "\n"


def _short(stamp: str) -> str:
    return stamp[:19].replace("T", " ") + " UTC"
