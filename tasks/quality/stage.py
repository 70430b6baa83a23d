"""The quality stage: tag survivors + ingest metadata -> quality.parquet (one of four labels each).

Samples are the ids in the tag stage's tags.parquet; their popularity signals and creation year come
from the ingest stage's posts.parquet. Rows without a usable score, date or metadata are rejected
with a reason code; everything else gets exactly one label. Pictures (visuals/*.png): a contact sheet
per label and the norm_score histogram with the label boundaries.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_contracts.errors import ConfigError, StageError
from data_contracts.ingest import POSTS_SCHEMA
from data_contracts.quality import QUALITY_LABELS, QUALITY_SCHEMA
from data_contracts.tables import REJECTS_SCHEMA, write_table
from data_contracts.tag import TAGS_SCHEMA
from pipeline_config.quality import SIGNAL_COLUMNS, QualityConfig
from tasks.common.upstream import read_upstream
from tasks.common.pictures import draw_pictures
from tasks.common.stage import StageContext, StageReport, StageResult, StageSpec
from tasks.quality import core
from tasks.quality.visuals import make_label_sheets, make_norm_histogram

CODE_VERSION = "quality-2"  # 2: contact sheets and histogram in the report
QUALITY_FILE = "quality.parquet"
REJECTS_FILE = "rejects.parquet"
MAX_ITEMS = 24  # thumbnails per label sheet


def _numeric_column(table: pa.Table, name: str) -> np.ndarray:
    col = table.column(name)
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        raise ConfigError(f"quality.extra_features: column {name!r} is {col.type}, not numeric")
    return col.to_numpy(zero_copy_only=False).astype(np.float64)


def _lookup(haystack: np.ndarray, needles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row index in haystack of every needle (first occurrence) and whether it was found."""
    if len(haystack) == 0:
        return np.zeros(len(needles), np.int64), np.zeros(len(needles), bool)
    order = np.argsort(haystack, kind="stable")
    pos = np.minimum(np.searchsorted(haystack[order], needles), len(haystack) - 1)
    return order[pos], haystack[order][pos] == needles


def _numeric_names(schema: pa.Schema) -> list[str]:
    return [f.name for f in schema if (pa.types.is_integer(f.type) or pa.types.is_floating(f.type)) and f.name != "id"]


def build_quality(
    posts: pa.Table, tags: pa.Table, cfg: QualityConfig
) -> tuple[pa.Table, pa.Table, dict, StageReport]:
    """Pure table-in/table-out core of the stage: (quality, rejects, manifest-level info, report)."""
    extra_posts = [n for n in cfg.extra_features if n in posts.column_names]
    extra_tags = [n for n in cfg.extra_features if n in tags.column_names and n not in extra_posts]
    unknown = [n for n in cfg.extra_features if n not in extra_posts and n not in extra_tags]
    if unknown:
        choices = sorted(set(_numeric_names(POSTS_SCHEMA)) | set(_numeric_names(TAGS_SCHEMA)))
        raise ConfigError(
            f"quality.extra_features: no column {unknown[0]!r} in posts or tags; numeric columns: {', '.join(choices)}"
        )

    sample_ids = np.unique(tags.column("id").to_numpy())
    rows, found = _lookup(posts.column("id").to_numpy(), sample_ids)
    rejects: list[dict] = [
        {"id": int(i), "reason": "no_metadata", "detail": "id is in tags.parquet but not in the ingest posts"}
        for i in sample_ids[~found]
    ]
    ids, rows = sample_ids[found], rows[found]
    sub = posts.take(pa.array(rows, type=pa.int64()))
    created = sub.column("created_at")
    years = pc.year(created).fill_null(0).to_numpy(zero_copy_only=False)

    signals_raw = {name: sub.column(name) for name in cfg.signals}
    extras_raw: dict[str, pa.ChunkedArray] = {n: sub.column(n) for n in extra_posts}
    if extra_tags:
        t_rows, _ = _lookup(tags.column("id").to_numpy(), ids)
        for n in extra_tags:
            extras_raw[n] = tags.column(n).take(pa.array(t_rows, type=pa.int64()))
    for n, col in extras_raw.items():
        _numeric_column(pa.table({n: col}), n)  # type check with a clear message

    def null(col: pa.ChunkedArray) -> np.ndarray:
        return pc.is_null(col, nan_is_null=True).to_numpy(zero_copy_only=False)

    # First matching reason wins: score, then date, then any other signal / extra feature.
    no_score = null(signals_raw["score"]) if "score" in signals_raw else np.zeros(len(ids), bool)
    no_date = null(created) & ~no_score
    other = {n: null(c) for n, c in {**signals_raw, **extras_raw}.items() if n != "score"}
    keep = ~(no_score | no_date)
    for i in np.flatnonzero(no_score):
        rejects.append({"id": int(ids[i]), "reason": "no_score", "detail": "score is null"})
    for i in np.flatnonzero(no_date):
        rejects.append({"id": int(ids[i]), "reason": "no_date",
                        "detail": "created_at is null: the year normalisation needs it"})
    missing_any = np.zeros(len(ids), bool)
    for m in other.values():
        missing_any |= m
    for i in np.flatnonzero(missing_any & keep):
        missing = [n for n, m in other.items() if m[i]]
        rejects.append({"id": int(ids[i]), "reason": "missing_signal", "detail": f"null {', '.join(missing)}"})
    keep &= ~missing_any
    if not keep.any():
        raise StageError(
            f"quality: none of the {len(sample_ids)} samples has a usable score, date and signals "
            f"({', '.join(cfg.signals)}); check the ingest output or quality.signals"
        )

    ids, years = ids[keep], years[keep].astype(np.int64)
    signals = {n: col.to_numpy(zero_copy_only=False)[keep].astype(np.float64) for n, col in signals_raw.items()}
    extras = {n: col.to_numpy(zero_copy_only=False)[keep].astype(np.float64) for n, col in extras_raw.items()}

    groups = core.pool_years(years, cfg.min_posts_per_year)
    gidx = core.group_index(years, groups)
    # Fixed feature order (not YAML order): the same fingerprint must give the same clusters.
    weights = {n: cfg.signals[n] for n in SIGNAL_COLUMNS if n in cfg.signals}
    extra_weights = {n: cfg.extra_features[n] for n in sorted(cfg.extra_features)}
    norm = core.normalise(signals, weights, gidx, extras, extra_weights)
    lab = core.label_samples(norm, cfg.method, cfg.percentile_cuts, cfg.seed, cfg.n_init)

    labels = np.array(QUALITY_LABELS, dtype=object)[lab.cluster]
    quality = pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "year": pa.array(years, pa.int16()),
            "norm_score": pa.array(norm.norm_score, pa.float32()),
            "label": pa.array(labels.tolist(), pa.string()),
            "cluster": pa.array(lab.cluster, pa.int8()),
        }
    )
    rejects.sort(key=lambda r: r["id"])
    rejects_table = pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA)

    info, report = _summarise(cfg, ids, years, signals, norm, lab, groups, rejects)
    return quality, rejects_table, info, report


def _summarise(cfg, ids, years, signals, norm, lab, groups, rejects) -> tuple[dict, StageReport]:
    counts = {label: int((lab.cluster == c).sum()) for c, label in enumerate(QUALITY_LABELS)}
    bounds = core.boundaries(norm.norm_score, lab.cluster)
    if lab.method == "percentile":
        cuts = [0.0, *cfg.percentile_cuts, 1.0]
        for c, row in enumerate(bounds):
            row["cut_from"], row["cut_to"] = cuts[c], cuts[c + 1]
    for c, row in enumerate(bounds):
        for name, value in (lab.centres[c].items() if lab.centres else []):
            row[f"centre_{name}"] = round(value, 4)

    by_year = []
    for y in np.unique(years):
        mask = years == y
        group = next(g for g in groups if g.first <= y <= g.last)
        row = {"year": int(y), "year_group": group.name, "count": int(mask.sum())}
        row.update({label: int((lab.cluster[mask] == c).sum()) for c, label in enumerate(QUALITY_LABELS)})
        by_year.append(row)

    examples = []
    for c, idxs in core.example_indices(norm.norm_score, lab.cluster, cfg.examples_per_label).items():
        for i in idxs:
            row = {"label": QUALITY_LABELS[c], "id": int(ids[i]), "year": int(years[i]),
                   "norm_score": round(float(norm.norm_score[i]), 4)}
            row.update({name: int(signals[name][i]) for name in signals})
            examples.append(row)

    reasons = dict(sorted(Counter(r["reason"] for r in rejects).items()))
    stats = {
        "method_requested": cfg.method,
        "method": lab.method,
        "note": lab.note,
        "boundaries": bounds,
        "year_groups": [{"group": g.name, "first": g.first, "last": g.last, "count": g.count} for g in groups],
        "reject_reasons": reasons,
        "features": norm.feature_names,
    }
    n = len(ids)
    lines = [
        f"### quality: {n} samples labelled ({lab.method}), {len(rejects)} rejected",
        "",
        "| label | count | share | norm_score min..max |",
        "|---|---|---|---|",
    ]
    for row in bounds:
        rng = "-" if row["count"] == 0 else f"{row['norm_min']:.3f}..{row['norm_max']:.3f}"
        lines.append(f"| {row['label']} | {row['count']} | {row['count'] / n:.1%} | {rng} |")
    lines += ["", f"Year groups (min {cfg.min_posts_per_year} posts): "
              + ", ".join(f"{g.name} ({g.count})" for g in groups)]
    if lab.note:
        lines += ["", f"Note: {lab.note}"]
    if reasons:
        lines += ["", "Rejects: " + ", ".join(f"{k} {v}" for k, v in reasons.items())]
    report = StageReport(
        summary_md="\n".join(lines),
        tables={"quality-boundaries": bounds, "quality-by-year": by_year, "quality-examples": examples},
    )
    info = {"method": lab.method, "label_counts": counts, "stats": stats}
    return info, report


def build(ctx: StageContext) -> StageResult:
    cfg: QualityConfig = ctx.section
    ctx.progress(0.0, "reading tags and posts")
    tags_cols = ["id", *[n for n in cfg.extra_features if n in TAGS_SCHEMA.names]]
    posts_cols = ["id", "created_at", *cfg.signals, *[n for n in cfg.extra_features if n in POSTS_SCHEMA.names]]
    tags = read_upstream(ctx.store, ctx.upstream["tag"], "tags", TAGS_SCHEMA, list(dict.fromkeys(tags_cols)))
    posts = read_upstream(ctx.store, ctx.upstream["ingest"], "posts", POSTS_SCHEMA, list(dict.fromkeys(posts_cols)))
    ctx.progress(0.3, f"labelling {tags.num_rows} samples")
    quality, rejects, info, report = build_quality(posts, tags, cfg)
    write_table(quality, ctx.work / QUALITY_FILE, QUALITY_SCHEMA)
    write_table(rejects, ctx.work / REJECTS_FILE, REJECTS_SCHEMA)
    ctx.progress(0.8, "drawing label sheets")
    images, note = make_pictures(ctx, quality)
    report.images.update(images)
    report.summary_md += note
    ctx.progress(1.0, "done")
    ctx.log.info("quality: %s", info["label_counts"])
    return StageResult(
        row_counts={"quality": quality.num_rows, "rejects": rejects.num_rows},
        stats=info["stats"],
        manifest_fields={"method": info["method"], "label_counts": info["label_counts"]},
        report=report,
    )


def make_pictures(ctx: StageContext, quality: pa.Table) -> tuple[dict[str, str], str]:
    """The norm_score histogram and one contact sheet per label (images from the ingest posts' pool paths)."""
    def label_sheets() -> dict[str, str]:
        posts = read_upstream(ctx.store, ctx.upstream["ingest"], "posts", POSTS_SCHEMA, ["id", "image_path", "score"])
        return make_label_sheets(quality, posts, ctx.store.pool_dir(), ctx.work, seed=ctx.cfg.seed, max_items=MAX_ITEMS)

    return draw_pictures(ctx, {
        "norm_score histogram": lambda: make_norm_histogram(quality, ctx.work),
        "label sheets": label_sheets,
    })


SPEC = StageSpec(name="quality", upstream=("ingest", "tag"), code_version=CODE_VERSION, build=build)
