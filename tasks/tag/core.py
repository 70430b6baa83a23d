"""Pure tag logic: read the ingest posts, tag a shard of them, summarise the result for the report.

Nothing here knows about shards, journals or workers (tasks/tag/stage.py does): `tag_shard` takes posts, a
pool folder, a loaded backend and a merger, and returns rows and rejects; `summarise` turns the final tables
into the report's stats, tables and summary.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_contracts.errors import ContractError
from data_contracts.ingest import POSTS_SCHEMA, IngestManifest
from data_contracts.store import ArtifactStore
from data_contracts.tables import read_table
from data_contracts.tag import TAGS_SCHEMA
from tasks.common.stage import StageReport
from tasks.tag.cpu_pipeline import run_cpu_pipeline
from tasks.tag.gpu_pipeline import BatchResult, run_pipeline
from tasks.tag.merge import Merger
from tasks.tag.model import TaggerFolder
from tasks.tag.preprocess import pool_relative
from tasks.tag.weights import weight_stats, weight_tables

PARTIAL_SCHEMA = pa.schema([f for f in TAGS_SCHEMA if f.name != "tag_weight"])  # a shard's rows: no weight yet
POST_COLUMNS = ["id", "tags_general", "tags_character", "tags_copyright", "tags_artist", "image_path", "file_size"]


# --- input ---------------------------------------------------------------------------------------
def posts_files(manifest: IngestManifest) -> list[str]:
    """The posts table of an ingest output: posts.parquet, or shards posts/*.parquet / posts-*.parquet."""
    names = [f.path for f in manifest.files if f.path.endswith(".parquet") and
             (f.path == "posts.parquet" or f.path.startswith(("posts/", "posts-", "posts_")))]
    if not names:
        raise ContractError(f"ingest {manifest.fingerprint}: manifest lists no posts.parquet; rerun `fm run ingest`")
    return sorted(names)


def read_posts(store: ArtifactStore, manifest: IngestManifest) -> pa.Table:
    tables = []
    for rel in posts_files(manifest):
        where = f"ingest/{manifest.fingerprint}/{rel}"
        tables.append(read_table(store.path(manifest, rel), POSTS_SCHEMA, where, columns=POST_COLUMNS))
    table = pa.concat_tables(tables).sort_by("id")
    if table.num_rows != len(pc.unique(table["id"])):
        raise ContractError(f"ingest {manifest.fingerprint}: posts table repeats ids; rerun `fm run ingest --force`")
    return table


def kept_posts(posts: pa.Table, dedup: pa.Table) -> pa.Table:
    """The posts the dedup stage kept; a post dedup has no row for is a contract error (another ingest)."""
    known = pc.is_in(posts["id"], value_set=dedup["id"])
    if not pc.all(known).as_py():
        missing = posts.filter(pc.invert(known))["id"].to_pylist()[:5]
        raise ContractError(f"the dedup output has no row for ingest posts {missing}; rerun `fm run dedup`")
    kept_ids = dedup.filter(dedup["kept"])["id"]
    return posts.filter(pc.is_in(posts["id"], value_set=kept_ids))


# --- reuse --------------------------------------------------------------------------------------
REUSE_KEY = ("image_path", "tags_general", "tags_character")  # image_path names the file by its md5


def reusable(prev_posts: pa.Table, prev_rows: pa.Table, posts: pa.Table) -> pa.Table:
    """The rows (PARTIAL_SCHEMA) of an earlier tag output, made by the same tagger, that hold as they are for
    `posts`: same id, same image file and same Danbooru general/character tags (the inputs of the merge) as the
    posts that output was made from. Sorted by id. Only the other posts need the tagger (an update's new and
    changed posts); the tag-rarity weights are global and are recomputed over every row."""
    def keys(table: pa.Table) -> dict[int, tuple]:
        cols = [table[c].to_pylist() for c in REUSE_KEY]
        return {i: (path, tuple(gen or ()), tuple(char or ()))
                for i, path, gen, char in zip(table["id"].to_pylist(), *cols)}

    before, now = keys(prev_posts), keys(posts)
    same = [i for i, key in now.items() if before.get(i) == key]
    rows = prev_rows.select(PARTIAL_SCHEMA.names)
    return rows.filter(pc.is_in(rows["id"], value_set=pa.array(same, pa.int64()))).sort_by("id")


# --- tagging -------------------------------------------------------------------------------------
def tag_batches(folder: TaggerFolder, cfg: Any, items: list[tuple[int, Path]], backend) -> Iterator[BatchResult]:
    if backend.name == "torch" and backend.device == "cuda":
        return run_pipeline(items, lambda x: backend.predict_tensor(x, normalised=True), backend.input_size,
                            backend.device, batch_size=cfg.batch_size, workers=max(cfg.workers, 4),
                            transform=backend.normalise)
    return run_cpu_pipeline(items, backend.predict, backend.input_size, cfg.batch_size, cfg.workers)


def tag_shard(posts: pa.Table, pool: Path, folder: TaggerFolder, cfg: Any, backend, merger: Merger
              ) -> tuple[list[dict], list[dict]]:
    ids = posts["id"].to_pylist()
    general = dict(zip(ids, posts["tags_general"].to_pylist()))
    character = dict(zip(ids, posts["tags_character"].to_pylist()))
    rels = dict(zip(ids, posts["image_path"].to_pylist()))
    items = [(i, pool / rel) for i, rel in rels.items()]
    rows, rejects = [], []
    for result in tag_batches(folder, cfg, items, backend):
        for key, probs in zip(result.keys, result.probs):
            if not np.all(np.isfinite(probs)):
                rejects.append({"id": key, "reason": "tagger_nan", "detail": "the tagger returned NaN/inf"})
                continue
            rows.append({"id": key, **merger.merge(probs, general[key], character[key])})
        for key, err in result.errors:
            detail = pool_relative(err.detail, pool / rels[key], rels[key], pool)
            rejects.append({"id": key, "reason": err.reason, "detail": detail[:500]})
    rows.sort(key=lambda r: r["id"])
    rejects.sort(key=lambda r: r["id"])
    return rows, rejects


# --- report --------------------------------------------------------------------------------------
def _counter_rows(counter: Counter, key: str, top: int, extra: dict | None = None) -> list[dict]:
    rows = []
    for name, n in counter.most_common(top):
        row = {key: name, "images": int(n)}
        if extra is not None:
            row["mean_prob"] = round(extra[name] / n, 4)
        rows.append(row)
    return rows


def summarise(tags: pa.Table, rejects: pa.Table, weights, weight_cfg, concepts, meta: dict) -> tuple[dict, StageReport]:
    n = tags.num_rows
    added, added_p, disputed, disputed_p = Counter(), defaultdict(float), Counter(), defaultdict(float)
    for lst in tags["added"].to_pylist():
        for d in lst:
            added[d["tag"]] += 1
            added_p[d["tag"]] += d["prob"]
    for lst in tags["disputed"].to_pylist():
        for d in lst:
            disputed[d["tag"]] += 1
            disputed_p[d["tag"]] += d["prob"]
    ratings = Counter(tags["rating"].to_pylist())
    reasons = Counter(rejects["reason"].to_pylist())
    n_added = sum(added.values())
    n_disputed = sum(disputed.values())
    wstats = weight_stats(weights, weight_cfg.bounds)
    stats = {
        **meta,
        "images_tagged": n,
        "images_rejected": rejects.num_rows,
        "reject_reasons": dict(reasons),
        "added_per_image": n_added / max(n, 1),
        "disputed_per_image": n_disputed / max(n, 1),
        "rating_counts": dict(ratings),
        "weight": wstats,
    }
    tables = {
        "rating_counts": [{"rating": r, "images": int(ratings.get(r, 0))}
                          for r in ("general", "sensitive", "questionable", "explicit")],
        "top_added_tags": _counter_rows(added, "tag", 30, added_p),
        "top_disputed_tags": _counter_rows(disputed, "tag", 30, disputed_p),
        "reject_reasons": [{"reason": r, "images": int(c)} for r, c in reasons.most_common()],
        **weight_tables(weights, concepts, weight_cfg.bounds, weight_cfg.report_top),
    }
    summary = (
        f"### tag\n"
        f"- tagger **{meta['model_name']}** ({meta['backend']} on {meta['device']}, input {meta['input_size']} px, "
        f"{meta['labels']} labels, weights sha256 `{meta['model_identity'][:16]}`)\n"
        f"- {n} images tagged, {rejects.num_rows} rejected ({', '.join(f'{r}: {c}' for r, c in reasons.items()) or 'none'})\n"
        f"- tagger added {n_added / max(n, 1):.2f} tags per image; {n_disputed / max(n, 1):.2f} Danbooru tags "
        f"per image disputed (prob < {meta['thresholds']['disagree_below']})\n"
        f"- thresholds: {meta['thresholds']}\n"
        f"- tag_weight ({weight_cfg.method}, bounds {list(weight_cfg.bounds)}): mean {wstats.get('mean', 1):.3f}, "
        f"min {wstats.get('min', 1):.3f}, max {wstats.get('max', 1):.3f}, p50 {wstats.get('p50', 1):.3f}\n"
    )
    if str(meta["model_name"]).startswith("builtin:"):
        summary += "- note: the built-in tiny tagger has random weights (demo); its added/disputed tags are not meaningful\n"
    return stats, StageReport(summary_md=summary, tables=tables)
