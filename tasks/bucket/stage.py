"""The bucket stage: quality survivors + ingest sizes -> buckets.parquet (bucket, resize, crop, flip).

Samples are the ids in the quality stage's quality.parquet; original sizes come from the ingest
stage's posts.parquet. Crop boxes are in pixels of the resized image (resize_w x resize_h); the
cache stage resizes to that size, crops [left, right) x [top, bottom), then flips when `flip`.
Pictures: the aspect-ratio histogram and, per bucket, thumbnails with the crop box drawn (visuals/*.png).
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa

from data_contracts.bucket import BUCKETS_SCHEMA
from data_contracts.errors import StageError
from data_contracts.ingest import POSTS_SCHEMA
from data_contracts.quality import QUALITY_SCHEMA
from data_contracts.tables import REJECTS_SCHEMA, write_table
from pipeline_config.bucket import TAG_COLUMNS, BucketConfig
from tasks.bucket import core
from tasks.bucket.visuals import make_bucket_sheets
from tasks.common.upstream import read_upstream
from tasks.common.pictures import draw_pictures
from tasks.common.stage import StageContext, StageReport, StageResult, StageSpec
from tasks.common.visuals import new_figure

CODE_VERSION = "bucket-2"  # 2: crop-box sheets in the report
BUCKETS_FILE = "buckets.parquet"
REJECTS_FILE = "rejects.parquet"
HISTOGRAM_FILE = "aspect_ratio_histogram.png"
MAX_ITEMS = 16  # thumbnails per bucket sheet
MAX_BUCKETS = 12  # sheets: the fullest buckets


def _rows(table: pa.Table, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, found) per id: the first row of `table` with that id (rows of missing ids are arbitrary)."""
    table_ids = table.column("id").to_numpy()
    if len(table_ids) == 0:
        return np.zeros(len(ids), np.int64), np.zeros(len(ids), bool)
    order = np.argsort(table_ids, kind="stable")
    pos = np.minimum(np.searchsorted(table_ids[order], ids), len(table_ids) - 1)
    rows = order[pos]
    return rows, table_ids[rows] == ids


def _sizes(posts: pa.Table, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(width, height, found) per id; a missing post or null size comes back as NaN."""
    if posts.num_rows == 0:
        nan = np.full(len(ids), np.nan)
        return nan, nan.copy(), np.zeros(len(ids), bool)
    rows, found = _rows(posts, ids)
    w = posts.column("width").to_numpy(zero_copy_only=False).astype(np.float64)[rows]
    h = posts.column("height").to_numpy(zero_copy_only=False).astype(np.float64)[rows]
    return w, h, found


def _select(posts: pa.Table, quality: pa.Table, ids: np.ndarray, w: np.ndarray, h: np.ndarray,
            cfg: BucketConfig) -> tuple[core.Selection, str]:
    """The phase's data selection over the posts with metadata (ids, w, h aligned), and its summary line."""
    sel = cfg.select
    rows, _ = _rows(posts, ids)
    take = pa.array(rows, pa.int64())
    label = None
    if sel.quality_labels:
        qrows, _ = _rows(quality, ids)
        label = quality.column("label").take(pa.array(qrows, pa.int64()))
    rating = posts.column("rating").take(take) if sel.ratings else None
    tags = [posts.column(c).take(take) for c in TAG_COLUMNS] if sel.require_tags or sel.exclude_tags else None
    s = core.select_posts(sel, w, h, label=label, rating=rating, tags=tags)
    rules = ", ".join(f"{rule} {n}" for rule, n in s.rule_counts.items())
    line = f"selection (bucket.select): {s.selected} of {len(ids)} posts selected; not selected by rule: {rules}"
    if s.selected == 0:
        raise StageError(
            f"bucket: bucket.select leaves no post out of {len(ids)} (failing by rule: {rules}); "
            "loosen bucket.select (quality_labels, min_pixels, min_side, ratings, require_tags, exclude_tags)"
        )
    return s, line


def build_buckets(posts: pa.Table, quality: pa.Table, cfg: BucketConfig) -> tuple[pa.Table, pa.Table, dict, StageReport]:
    """Pure table-in/table-out core of the stage: (buckets, rejects, manifest-level info, report)."""
    ids = np.unique(quality.column("id").to_numpy())
    w, h, found = _sizes(posts, ids)
    pre_rejects = [
        {"id": int(i), "reason": "no_metadata", "detail": "id is in quality.parquet but not in the ingest posts"}
        for i in ids[~found]
    ]
    ids_ok, w_ok, h_ok = ids[found], w[found], h[found]
    select_line, selection_stats = "", None
    if cfg.select.active and len(ids_ok):  # before bucketing: small-bucket merging sees only the selected posts
        s, select_line = _select(posts, quality, ids_ok, w_ok, h_ok, cfg)
        pre_rejects += [
            {"id": int(i), "reason": "not_selected", "detail": s.reasons[k]}
            for k, i in zip(np.flatnonzero(~s.mask).tolist(), ids_ok[~s.mask].tolist())
        ]
        selection_stats = {"selected": s.selected, "of": len(ids_ok), "not_selected_by_rule": s.rule_counts}
        ids_ok, w_ok, h_ok = ids_ok[s.mask], w_ok[s.mask], h_ok[s.mask]
    predefined = [] if cfg.no_upscale else core.make_buckets(cfg)
    a = core.assign(ids_ok, w_ok, h_ok, cfg, predefined or None)
    rejects = sorted(pre_rejects + a.rejects, key=lambda r: r["id"])
    if len(a.ids) == 0:
        reasons = Counter(r["reason"] for r in rejects)
        raise StageError(
            f"bucket: no sample left out of {len(ids)} (rejects: {dict(reasons)}); "
            "lower bucket.min_image_side, set bucket.small_images=upscale or bucket.small_buckets=merge"
        )
    table = pa.table(
        {
            "id": a.ids, "width": a.width, "height": a.height, "bucket_w": a.bucket_w, "bucket_h": a.bucket_h,
            "resize_w": a.resize_w, "resize_h": a.resize_h, "crop_left": a.crop_left, "crop_top": a.crop_top,
            "crop_right": a.crop_right, "crop_bottom": a.crop_bottom, "flip": a.flip,
        }
    ).cast(BUCKETS_SCHEMA)
    rejects_table = pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA)

    final = a.final_counts()
    generated = predefined or sorted(set(final))
    bucket_rows = []
    for b in sorted(set(generated) | set(a.initial_counts)):
        target = a.mapping.get(b)
        n_initial = a.initial_counts.get(b, 0)
        merged_into = ""
        if n_initial and target is None:
            merged_into = "(dropped)"
        elif n_initial and target != b:
            merged_into = target.name
        bucket_rows.append(
            {
                "bucket": b.name, "width": b.width, "height": b.height, "aspect": round(b.aspect, 4),
                "assigned": n_initial, "count": final.get(b, 0),
                "merged_into": merged_into,
            }
        )
    histogram = core.ar_histogram(a.width, a.height, cfg.histogram_bins)
    upscaled = int(((a.resize_w > a.width) | (a.resize_h > a.height)).sum())
    kept_px = (a.bucket_w * a.bucket_h).astype(np.float64) / (a.resize_w * a.resize_h)
    reasons = dict(sorted(Counter(r["reason"] for r in rejects).items()))
    stats = {
        "bucket_table": bucket_rows,
        "aspect_ratio_histogram": histogram,
        "threshold": cfg.bucket_threshold,
        "merged": {r["bucket"]: r["merged_into"] for r in bucket_rows if r["merged_into"]},
        "reject_reasons": reasons,
        "upscaled": upscaled,
        "mean_kept_fraction": round(float(kept_px.mean()), 4),  # crop keeps this share of the pixels
        "flipped": int(a.flip.sum()),
    }
    if selection_stats is not None:
        stats["selection"] = selection_stats
    used = [r for r in bucket_rows if r["count"]]
    lines = [
        f"### bucket: {len(a.ids)} samples in {len(used)} buckets"
        f" ({'no_upscale' if cfg.no_upscale else f'{len(generated)} generated'}), {len(rejects)} rejected",
        f"area {cfg.resolution}², step {cfg.step}, sides {cfg.min_side}..{cfg.max_side}; "
        f"min samples per bucket {cfg.bucket_threshold} ({cfg.small_buckets}); crop {cfg.crop}; "
        f"flip p={cfg.flip_prob}; {upscaled} upscaled; crops keep {kept_px.mean():.1%} of the pixels",
        *([select_line] if select_line else []),
        "",
        "| bucket | aspect | count | merged from |",
        "|---|---|---|---|",
    ]
    for r in used:
        sources = [s["bucket"] for s in bucket_rows if s["merged_into"] == r["bucket"]]
        lines.append(f"| {r['bucket']} | {r['aspect']} | {r['count']} | {', '.join(sources)} |")
    if reasons:
        lines += ["", "Rejects: " + ", ".join(f"{k} {v}" for k, v in reasons.items())]
    report = StageReport(
        summary_md="\n".join(lines),
        tables={"bucket-table": bucket_rows, "bucket-aspect-histogram": histogram},
    )
    info = {
        "buckets": [(b.width, b.height) for b in generated],
        "bucket_counts": {b.name: n for b, n in final.items()},
        "stats": stats,
    }
    return table, rejects_table, info, report


def plot_histogram(width: np.ndarray, height: np.ndarray, final: dict[str, int], path) -> None:
    """Aspect-ratio histogram of the images with the used buckets' aspect ratios marked."""
    fig = new_figure(7, 3)  # Agg canvas without pyplot: no global state, safe in worker threads
    ax = fig.add_subplot()
    ax.hist(np.log2(width / height), bins=64, range=(-2, 2), color="#4477aa")
    for name in final:
        bw, bh = (int(v) for v in name.split("x"))
        ax.axvline(np.log2(bw / bh), color="#cc6677", lw=0.8)
    ticks = [-2, -1, -0.415, 0, 0.415, 1, 2]
    ax.set_xticks(ticks, ["1:4", "1:2", "3:4", "1:1", "4:3", "2:1", "4:1"])
    ax.set_xlabel("aspect ratio w:h (log scale); red lines: buckets in use")
    ax.set_ylabel("images")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")  # the store never lists *.tmp
    fig.savefig(tmp, format="png", metadata={"Software": None})  # no version stamp: same bytes every run
    tmp.replace(path)


def make_pictures(ctx: StageContext, table: pa.Table, bucket_counts: dict[str, int]) -> tuple[dict[str, str], str]:
    """The aspect-ratio histogram and a crop-box sheet per bucket (images from the ingest posts' pool paths)."""
    def histogram() -> dict[str, str]:
        plot_histogram(table.column("width").to_numpy().astype(np.float64),
                       table.column("height").to_numpy().astype(np.float64), bucket_counts, ctx.work / HISTOGRAM_FILE)
        return {"aspect-ratio histogram": HISTOGRAM_FILE}

    def bucket_sheets() -> dict[str, str]:
        posts = read_upstream(ctx.store, ctx.upstream["ingest"], "posts", POSTS_SCHEMA, ["id", "image_path", "score"])
        return make_bucket_sheets(table, posts, ctx.store.pool_dir(), ctx.work, seed=ctx.cfg.seed,
                                  max_items=MAX_ITEMS, max_buckets=MAX_BUCKETS)

    return draw_pictures(ctx, {"aspect-ratio histogram": histogram, "bucket sheets": bucket_sheets})


def build(ctx: StageContext) -> StageResult:
    cfg: BucketConfig = ctx.section
    ctx.progress(0.0, "reading quality and posts")
    quality_cols, posts_cols = core.selection_columns(cfg.select)  # extra columns only for an active select
    quality = read_upstream(ctx.store, ctx.upstream["quality"], "quality", QUALITY_SCHEMA, ["id", *quality_cols])
    posts = read_upstream(ctx.store, ctx.upstream["ingest"], "posts", POSTS_SCHEMA, ["id", "width", "height", *posts_cols])
    ctx.progress(0.3, f"bucketing {quality.num_rows} samples")
    table, rejects, info, report = build_buckets(posts, quality, cfg)
    write_table(table, ctx.work / BUCKETS_FILE, BUCKETS_SCHEMA)
    write_table(rejects, ctx.work / REJECTS_FILE, REJECTS_SCHEMA)
    ctx.progress(0.8, "drawing the histogram and bucket sheets")
    images, note = make_pictures(ctx, table, info["bucket_counts"])
    report.images.update(images)
    report.summary_md += note
    ctx.progress(1.0, "done")
    ctx.log.info("bucket: %s", info["bucket_counts"])
    return StageResult(
        row_counts={"buckets": table.num_rows, "rejects": rejects.num_rows},
        stats=info["stats"],
        manifest_fields={"buckets": info["buckets"], "bucket_counts": info["bucket_counts"]},
        report=report,
    )


SPEC = StageSpec(name="bucket", upstream=("ingest", "quality"), code_version=CODE_VERSION, build=build)
