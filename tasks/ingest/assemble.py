"""Turn the ledger into the contract outputs: posts.parquet, rejects.parquet, stats and the report.

Rows are written in crawl order (query order, then newest first), streamed in batches, so the output is
identical whether or not the run was interrupted, and memory does not grow with the dataset.
"""
from __future__ import annotations

import os
import re
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from data_contracts.errors import StageError
from data_contracts.ingest import POSTS_SCHEMA, REJECTS
from data_contracts.tables import rows_to_table
from pipeline_config.ingest import IngestConfig, counted_tags
from tasks.ingest.download import image_relpath
from tasks.ingest.reasons import REASONS
from tasks.ingest.ledger import Ledger

BATCH = 2000  # rows per Parquet write: bounds the memory of the final pass
# The ledger's duplicate_md5 detail names the post that owns the file (its journal keeps no md5 for rejects).
_DUP_OWNER = re.compile(r"same file as post (\d+)")


class StreamWriter:
    """Parquet written batch by batch to a temp file, renamed into place on close (atomic)."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path, self.schema = path, schema
        self.tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        self.writer = pq.ParquetWriter(self.tmp, schema, compression="zstd")
        self.rows: list[dict[str, Any]] = []
        self.count = 0

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if len(self.rows) >= BATCH:
            self._flush()

    def _flush(self) -> None:
        if self.rows:
            self.writer.write_table(rows_to_table(self.rows, self.schema))
            self.count += len(self.rows)
            self.rows = []

    def close(self) -> int:
        self._flush()
        self.writer.close()
        with open(self.tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(self.tmp, self.path)
        return self.count


def _query_terms(tags: str) -> list[str]:
    """The plain positive tags of a query (character candidates)."""
    return [t for t in counted_tags(tags) if not t.startswith(("-", "~")) and ":" not in t and "*" not in t]


def assemble(work: Path, ledger: Ledger, cfg: IngestConfig, plan: list[tuple[str, str, int]],
             source_desc: str, run_stats: dict[str, Any]) -> tuple[dict[str, int], dict[str, Any], str,
                                                                    dict[str, list[dict[str, Any]]], dict[int, str]]:
    """Write the tables; return (row_counts, stats, summary markdown, report tables, reject images).

    Reject images: {reject id: pool-relative image path} for the rejects whose file may be in the pool
    (failed downloads: their own md5; duplicate_md5: the owner's file). rejects.parquet has no path
    column, so this is the only place that knows them; callers check the pool before using a path.
    """
    labels = [label for label, _, _ in plan]
    failed: dict[int, tuple[str, str]] = {}
    journaled = {"pages": sum(q.pages for q in ledger.queries), "files_fetched": 0, "bytes": 0}
    for rec in ledger.download_records():
        if rec.get("bytes"):  # every attempt's downloads, a killed one's too (its client counters are lost)
            journaled["files_fetched"] += 1
            journaled["bytes"] += int(rec["bytes"])
        if not rec["ok"]:
            failed[int(rec["id"])] = (rec.get("reason", "error"), rec.get("detail", ""))
        else:
            failed.pop(int(rec["id"]), None)

    posts = StreamWriter(work / "posts.parquet", POSTS_SCHEMA)
    rejects = StreamWriter(work / "rejects.parquet", REJECTS)
    reasons: Counter = Counter()
    ok_by_q: Counter = Counter()
    failed_by_q: Counter = Counter()
    per_rating: Counter = Counter()
    per_year: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])  # posts, score sum, fav sum
    per_char: Counter = Counter()
    char_series: dict[str, Counter] = defaultdict(Counter)
    char_by_q: dict[int, Counter] = defaultdict(Counter)
    reject_images: dict[int, str] = {}
    dup_owner: dict[int, int] = {}  # duplicate_md5 reject id -> id of the post that owns the file
    owner_paths: dict[int, str] = {}
    try:
        for qi, post_id, reason, detail in ledger.metadata_rejects():
            rejects.add({"id": post_id, "reason": reason, "detail": detail, "query": labels[qi]})
            reasons[reason] += 1
            owner = _DUP_OWNER.fullmatch(detail or "") if reason == "duplicate_md5" else None
            if owner:
                dup_owner[post_id] = int(owner.group(1))
        wanted_owners = set(dup_owner.values())
        for qi, post in ledger.taken():
            path = image_relpath(post.md5, post.file_ext) if post.md5 and post.file_ext else ""
            if post.id in wanted_owners and path:
                owner_paths[post.id] = path
            if post.id not in ledger.outcome_ok:  # never written off: a post without an outcome is not done
                raise StageError(f"ingest: post {post.id} has no download outcome; rerun `fm run ingest` to fetch "
                                 "it (nothing was committed)")
            if post.id in failed:
                reason, detail = failed[post.id]
                rejects.add({"id": post.id, "reason": reason, "detail": detail, "query": labels[qi]})
                reasons[reason] += 1
                failed_by_q[qi] += 1
                if path:
                    reject_images[post.id] = path
                continue
            row = post.row()
            row["image_path"] = path
            row["query"] = labels[qi]
            posts.add(row)
            ok_by_q[qi] += 1
            per_rating[post.rating or "?"] += 1
            if post.created_at is not None:
                year = per_year[post.created_at.year]
                year[0] += 1
                year[1] += post.score or 0
                year[2] += post.fav_count or 0
            for char in post.tags_character:
                per_char[char] += 1
                char_by_q[qi][char] += 1
                for series in post.tags_copyright:
                    char_series[char][series] += 1
        n_posts = posts.close()
        n_rejects = rejects.close()
        for post_id, owner in dup_owner.items():
            if owner in owner_paths:
                reject_images[post_id] = owner_paths[owner]
    except BaseException:
        for writer in (posts, rejects):
            writer.writer.close()
            writer.tmp.unlink(missing_ok=True)
        raise

    # Characters a query asked for (a query tag that shows up as a character tag); none -> every character.
    targets = {t for qi, (_, tags, _) in enumerate(plan) for t in _query_terms(tags) if t in per_char}
    query_targets = {qi: [t for t in _query_terms(tags) if t in per_char] for qi, (_, tags, _) in enumerate(plan)}
    checked = targets or set(per_char)
    low = sorted((c for c in checked if per_char[c] < cfg.min_per_character), key=lambda c: (per_char[c], c))

    per_query_rows = []
    for qi, (label, tags, quota) in enumerate(plan):
        state = ledger.queries[qi]
        per_query_rows.append({
            "query": label, "tags": tags, "quota": quota if quota < 2**62 else None, "pages": state.pages,
            "fetched": state.fetched, "duplicates": state.duplicates, "taken": state.accepted,
            "rejected_metadata": sum(state.rejected.values()), "failed_download": failed_by_q[qi],
            "posts": ok_by_q[qi], "quota_met": state.accepted >= quota, "note": state.note,
        })
    per_char_rows = [
        {"character": c, "posts": n, "series": (char_series[c].most_common(1)[0][0] if char_series[c] else ""),
         "target": c in targets, "below_min": c in checked and n < cfg.min_per_character}
        for c, n in sorted(per_char.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
    per_rating_rows = [{"rating": r, "posts": per_rating[r]} for r in ("g", "s", "q", "e", "?") if per_rating[r]]
    per_year_rows = [
        {"year": y, "posts": v[0], "mean_score": round(v[1] / v[0], 2), "mean_fav_count": round(v[2] / v[0], 2)}
        for y, v in sorted(per_year.items())
    ]
    reason_rows = [{"reason": r, "count": n, "meaning": REASONS.get(r, REASONS["http_<status>"]
                                                                  if r.startswith("http_") else "")}
                   for r, n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))]

    stats = {
        "source": source_desc,
        "posts": n_posts,
        "rejects": n_rejects,
        "per_query": per_query_rows,
        "per_character": {c: n for c, n in sorted(per_char.items(), key=lambda kv: (-kv[1], kv[0]))},
        "per_rating": {r["rating"]: r["posts"] for r in per_rating_rows},
        "per_year": {str(r["year"]): r["posts"] for r in per_year_rows},
        "characters_below_min": {c: per_char[c] for c in low},
        "min_per_character": cfg.min_per_character,
        "run": run_stats,
        "all_attempts": journaled,
    }
    summary = _summary(source_desc, n_posts, n_rejects, per_query_rows, reasons, low, per_char, cfg,
                       targets, query_targets, labels, run_stats, journaled)
    tables = {"per_query": per_query_rows, "per_character": per_char_rows, "per_rating": per_rating_rows,
              "per_year": per_year_rows, "rejects_by_reason": reason_rows}
    return {"posts": n_posts, "rejects": n_rejects}, stats, summary, tables, reject_images


def _summary(source: str, n_posts: int, n_rejects: int, per_query: list[dict], reasons: Counter, low: list[str],
             per_char: Counter, cfg: IngestConfig, targets: set[str], query_targets: dict[int, list[str]],
             labels: list[str], run: dict[str, Any], journaled: dict[str, int]) -> str:
    lines = [f"## Ingest: {n_posts:,} verified posts, {n_rejects:,} rejects", "", f"Source: `{source}`", ""]
    lines += ["| query | taken / quota | posts | rejected | failed download | duplicates |",
              "|---|---|---|---|---|---|"]
    for row in per_query:
        quota = row["quota"] if row["quota"] is not None else "all"
        lines.append(f"| {row['query']} | {row['taken']} / {quota} | {row['posts']} | {row['rejected_metadata']} | "
                     f"{row['failed_download']} | {row['duplicates']} |")
    if reasons:
        lines += ["", "Rejects: " + ", ".join(f"{r} {n}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1]))]
    lines.append("")
    scope = "asked-for characters" if targets else "characters"
    if low:
        lines.append(f"**Warning:** {len(low)} {scope} below min_per_character ({cfg.min_per_character}):")
        shown = low[:50]
        lines.append(", ".join(f"`{c}` ({per_char[c]})" for c in shown) + (" …" if len(low) > len(shown) else ""))
    else:
        lines.append(f"All {len(targets) if targets else len(per_char)} {scope} have at least "
                     f"{cfg.min_per_character} posts.")
    for qi, row in enumerate(per_query):
        if row["posts"] == 0:
            lines.append(f"**Warning:** query `{labels[qi]}` produced no posts.")
    http = run.get("http") or {}
    attempts = int(run.get("attempts") or 1)
    if attempts > 1:  # a resumed run: this attempt's counters alone would hide the work of the killed ones
        lines += ["", f"Resumed: {attempts} attempts. Over all of them: {journaled['pages']} pages crawled, "
                      f"{journaled['files_fetched']} files fetched ({journaled['bytes'] / 2**20:.1f} MiB)."]
    if http:
        scope = " (this attempt)" if attempts > 1 else ""
        lines += ["", f"HTTP{scope}: {http.get('requests', 0)} requests, {http.get('retries', 0)} retries, "
                      f"{http.get('http_429', 0)} × 429"]
    dl = run.get("downloads") or {}
    if dl:
        lines.append(f"Files: {dl.get('fetched', 0)} fetched ({dl.get('bytes', 0) / 2**20:.1f} MiB), "
                     f"{dl.get('cached', 0)} already in the pool")
    return "\n".join(lines) + "\n"
