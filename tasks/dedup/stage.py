"""The dedup stage: a perceptual hash per ingested image, near-duplicate groups, one post kept per group.

Hashing is the long part (260k images: minutes over a machine's cores), so it is journaled: the posts are
hashed in blocks of HASH_BLOCK (in id order) and each block's hashes are one record of
`<work>/hashes.jsonl` (tasks/common/journal.py), fsynced; a killed run hashes only the blocks without a
record. Grouping (tasks/dedup/groups.py: sub-quadratic pair search + union-find, ~2 s at 260k) then runs over
every hash at once, and dedup.parquet + rejects.parquet + pictures are written. Downstream, tag reads
`kept`. With `dedup.enabled: false` nothing is hashed and every post is kept.

A hash depends on the image file alone (its md5 names it in the pool), so after `fm run --update` the hashes of
an earlier dedup output of the same code version are reused for every file it hashed (`earlier_hashes`): only
new and changed images are decoded. Grouping always runs over the whole dataset.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_contracts.dedup import DEDUP_SCHEMA, DedupManifest
from data_contracts.errors import BooruflowError, StageError
from data_contracts.ingest import POSTS_SCHEMA, IngestManifest
from data_contracts.tables import REJECTS_SCHEMA, read_table, write_table
from pipeline_config.dedup import DedupConfig
from tasks.common.earlier import complete_outputs, current_then_newest
from tasks.common.journal import Journal
from tasks.common.pictures import draw_pictures
from tasks.common.stage import StageContext, StageReport, StageResult, StageSpec
from tasks.common.upstream import read_upstream
from tasks.dedup.groups import DedupGroups, find_groups
from tasks.dedup.hashing import REASONS, hash_files, to_hex
from tasks.dedup.visuals import make_distance_histogram, make_group_sheet

CODE_VERSION = "dedup-1"
DEDUP_FILE = "dedup.parquet"
REJECTS_FILE = "rejects.parquet"
HASH_JOURNAL = "hashes.jsonl"
HASH_BLOCK = 4096  # posts per journal record: a kill loses at most this much hashing
POST_COLUMNS = ["id", "score", "width", "height", "parent_id", "image_path", "file_size"]


def earlier_hashes(ctx: StageContext) -> dict[str, int]:
    """{pool image path: pHash} from the newest other complete dedup output of this code version (the current
    one first) whose ingest output still exists; {} when there is none. Unhashable images are not in it."""
    store = ctx.store
    found = [m for m in complete_outputs(store, DedupManifest, exclude=ctx.fingerprint)
             if m.code_version == CODE_VERSION and "ingest" in m.upstream]
    for source in current_then_newest(store, found):
        try:
            ingest = store.read_manifest(IngestManifest, source.upstream["ingest"])
            before = read_upstream(store, ingest, "posts", POSTS_SCHEMA, ["id", "image_path"])
            hashed = read_table(store.path(source, DEDUP_FILE), DEDUP_SCHEMA, columns=["id", "phash"])
        except BooruflowError as exc:  # its ingest output is gone, a file is broken: try an older one
            ctx.log.info("dedup: not reusing the hashes of %s (%s)", source.fingerprint, exc)
            continue
        paths = dict(zip(before.column("id").to_pylist(), before.column("image_path").to_pylist()))
        known = {paths[i]: h for i, h in zip(hashed.column("id").to_pylist(), hashed.column("phash").to_pylist())
                 if h is not None and paths.get(i)}
        ctx.log.info("dedup: %d hashes known from %s", len(known), source.fingerprint)
        return known
    return {}


def hash_posts(ctx: StageContext, posts: pa.Table, workers: int | None,
               known: dict[str, int] | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """(uint64 hashes, ok flags, {row: (reason, detail)}) for `posts` (id order), resuming from the journal;
    images in `known` (pool path -> hash) are not decoded again."""
    known = known or {}
    n = posts.num_rows
    ids = posts.column("id").to_numpy()
    rels = posts.column("image_path").to_pylist()
    sizes = posts.column("file_size").to_pylist()
    hashes, ok, errors = np.zeros(n, np.uint64), np.zeros(n, bool), {}
    done: set[int] = set()
    with Journal(ctx.work / HASH_JOURNAL) as journal:  # opening cuts a record torn by a kill
        for rec in journal.records():
            start = int(rec["start"])
            if start % HASH_BLOCK or start >= n or rec["first_id"] != int(ids[start]):
                continue  # another post list (cannot happen under one fingerprint): hash that block again
            _apply(rec, start, hashes, ok, errors)
            done.add(start)
        todo = [s for s in range(0, n, HASH_BLOCK) if s not in done]
        if done:
            ctx.log.info("dedup: %d of %d hash blocks journaled by an earlier run", len(done), len(done) + len(todo))
        for k, start in enumerate(todo):
            stop = min(n, start + HASH_BLOCK)
            block = [known.get(rel) for rel in rels[start:stop]]
            new = [i for i, h in enumerate(block) if h is None]  # not hashed before (or not hashable then)
            pool = ctx.store.pool_fetch([rels[start + i] for i in new], [sizes[start + i] for i in new])
            result = hash_files([str(pool / rels[start + i]) for i in new], workers=workers)
            for i, h, good in zip(new, result.hashes, result.ok):
                block[i] = int(h) if good else None
            rec = {"start": start, "first_id": int(ids[start]),
                   "hashes": [None if h is None else to_hex(h) for h in block],
                   "errors": [[new[e.index], e.reason, e.detail[:300]] for e in result.errors]}
            journal.append(rec, sync=True)
            _apply(rec, start, hashes, ok, errors)
            ctx.progress((len(done) + k + 1) / max(1, len(done) + len(todo)),
                         f"hashed {stop} of {n} images ({len(new)} decoded, "
                         f"{len(new) / max(result.seconds, 1e-9):.0f}/s)")
    return hashes, ok, errors


def _apply(rec: dict, start: int, hashes: np.ndarray, ok: np.ndarray, errors: dict) -> None:
    for i, h in enumerate(rec["hashes"]):
        if h is not None:
            hashes[start + i], ok[start + i] = np.uint64(int(h, 16)), True
    for index, reason, detail in rec["errors"]:
        errors[start + int(index)] = (reason, detail)


def dedup_tables(posts: pa.Table, hashes: np.ndarray, ok: np.ndarray, cfg: DedupConfig
                 ) -> tuple[pa.Table, pa.Table, DedupGroups]:
    """dedup.parquet and rejects.parquet of `posts` (id order) from their hashes."""
    ids = posts.column("id").to_numpy()
    col = lambda name: np.array(posts.column(name).to_pylist(), dtype=np.float64)  # noqa: E731 - None -> NaN
    groups = find_groups(ids, hashes, col("score"), col("width"), col("height"), col("parent_id"), valid=ok,
                         max_distance=cfg.max_distance, parent_distance=cfg.parent_distance)
    # An image that could not be hashed is a singleton, kept: tag and cache reject it with their own reason
    # codes if they cannot read it either (a hashing hiccup must not silently drop a good image).
    kept = groups.kept
    table = pa.table({
        "id": pa.array(ids, pa.int64()),
        "phash": pa.array(hashes, pa.uint64(), mask=~ok),
        "group_id": pa.array(groups.group, pa.int64()),
        "group_size": pa.array(groups.size, pa.int32()),
        "kept": pa.array(kept),
        "distance": pa.array(groups.distance.astype(np.int32), pa.int32(), mask=~ok),
    }, schema=DEDUP_SCHEMA)
    rejects = [{"id": int(ids[row]), "reason": "near_duplicate",
                "detail": f"of post {int(groups.group[row])} (pHash distance {int(groups.distance[row])}, "
                          f"group of {int(groups.size[row])})"} for row in np.flatnonzero(~kept)]
    return table, pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA), groups


def _all_kept(posts: pa.Table) -> tuple[pa.Table, pa.Table]:
    n = posts.num_rows
    ids = posts.column("id")
    table = pa.table({"id": ids, "phash": pa.nulls(n, pa.uint64()), "group_id": ids,
                      "group_size": pa.array(np.ones(n, np.int32)), "kept": pa.array(np.ones(n, bool)),
                      "distance": pa.nulls(n, pa.int32())}, schema=DEDUP_SCHEMA)
    return table, REJECTS_SCHEMA.empty_table()


def _summary(cfg: DedupConfig, table: pa.Table, rejects: pa.Table, groups: DedupGroups | None,
             unhashed: Counter) -> tuple[dict, StageReport]:
    n = table.num_rows
    reasons = Counter(rejects.column("reason").to_pylist())
    kept = int(pc.sum(table.column("kept")).as_py() or 0)
    sizes = Counter(int(s) for s, k in zip(table.column("group_size").to_pylist(), table.column("kept").to_pylist())
                    if k and s > 1)
    stats = {"posts": n, "kept": kept, "dropped": n - kept, "reject_reasons": dict(reasons),
             "groups": groups.n_groups if groups is not None else 0,
             "max_distance": cfg.max_distance, "parent_distance": cfg.parent_distance,
             "parent_links": int(groups.pair_parent.sum()) if groups is not None else 0,
             "not_hashed": dict(unhashed)}
    if not cfg.enabled:
        md = f"### dedup\n- disabled (`dedup.enabled: false`): all {n} posts kept, nothing hashed\n"
        return stats, StageReport(summary_md=md, tables={})
    md = (f"### dedup\n- {n} posts hashed (64-bit pHash), {stats['groups']} near-duplicate groups "
          f"(pHash distance <= {cfg.max_distance}; parent/child <= {cfg.parent_distance}, "
          f"{stats['parent_links']} links only through Danbooru's parent_id)\n"
          f"- {kept} kept, {reasons.get('near_duplicate', 0)} dropped as near-duplicates "
          f"(kept per group: highest score, then larger image, then newest)\n")
    if unhashed:
        md += (f"- {sum(unhashed.values())} images could not be hashed and are kept as they are "
               f"({', '.join(f'{r}: {c}' for r, c in unhashed.most_common())}; tag and cache check them again)\n")
    tables = {"group_sizes": [{"group_size": s, "groups": c} for s, c in sorted(sizes.items())],
              "not_hashed": [{"reason": r, "posts": c, "meaning": REASONS.get(r, "")} for r, c in unhashed.most_common()]}
    return stats, StageReport(summary_md=md, tables=tables)


def build(ctx: StageContext) -> StageResult:
    cfg: DedupConfig = ctx.section
    posts = read_upstream(ctx.store, ctx.upstream["ingest"], "posts", POSTS_SCHEMA, POST_COLUMNS).sort_by("id")
    if posts.num_rows == 0:
        raise StageError("the ingest output has no posts; widen the ingest queries and rerun `fm run ingest`")
    groups, unhashed = None, Counter()
    if cfg.enabled:
        hashes, ok, errors = hash_posts(ctx, posts, cfg.workers or None, earlier_hashes(ctx))
        table, rejects, groups = dedup_tables(posts, hashes, ok, cfg)
        unhashed = Counter(reason for reason, _ in errors.values())
    else:
        table, rejects = _all_kept(posts)
    write_table(table, ctx.work / DEDUP_FILE, DEDUP_SCHEMA)
    write_table(rejects, ctx.work / REJECTS_FILE, REJECTS_SCHEMA)
    stats, report = _summary(cfg, table, rejects, groups, unhashed)
    if groups is not None:
        jobs = {"group sheet": lambda: make_group_sheet(groups, posts, ctx.store.pool_dir(), ctx.work,
                                                        max_groups=cfg.sheet_groups, fetch=ctx.store.pool_fetch),
                "distance histogram": lambda: make_distance_histogram(groups, ctx.work)}
        images, note = draw_pictures(ctx, jobs)
        report.images.update(images)
        report.summary_md += note
    (ctx.work / HASH_JOURNAL).unlink(missing_ok=True)  # the tables hold every hash now
    ctx.log.info("dedup: %d posts, %d kept, %d groups", stats["posts"], stats["kept"], stats["groups"])
    return StageResult(
        row_counts={"dedup": table.num_rows, "rejects": rejects.num_rows},
        stats=stats,
        manifest_fields={"max_distance": cfg.max_distance, "groups": stats["groups"],
                         "duplicates": stats["reject_reasons"].get("near_duplicate", 0)},
        report=report,
    )


SPEC = StageSpec(name="dedup", upstream=("ingest",), code_version=CODE_VERSION, build=build, resumable=True)
