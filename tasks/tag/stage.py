"""The tag stage: run the WD tagger over every ingested image, merge with the Danbooru tags, weight samples.

Work happens in shards of `tag.shard_size` posts (in id order). Each finished shard is journaled in
`<work>/journal/` (its tags table, then its rejects table — the rejects file is the "done" mark), so a
killed run resumes at the first unfinished shard. The final step joins the shards, computes the
tag-rarity weights over the whole dataset, writes tags.parquet + rejects.parquet + summary.json and
only then removes the journal; a kill during that step redoes only that step.
"""
from __future__ import annotations

import json
import shutil
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_contracts.errors import ContractError, StageError
from data_contracts.fingerprint import sha256_file
from data_contracts.ingest import POSTS_SCHEMA, IngestManifest
from data_contracts.store import ArtifactStore, atomic_write_text
from data_contracts.tables import REJECTS_SCHEMA, read_table, rows_to_table, write_table
from data_contracts.tag import TAGS_SCHEMA
from tasks.common.stage import StageContext, StageReport, StageResult, StageSpec
from tasks.tag.backends import choose_backend, load_backend, resolve_device
from tasks.tag.gpu_pipeline import BatchResult, run_pipeline
from tasks.tag.cpu_pipeline import run_cpu_pipeline
from tasks.tag.merge import Merger, MergeRules
from tasks.tag.model import TaggerFolder, resolve_model
from tasks.tag.weights import compute_weights, weight_stats, weight_tables

CODE_VERSION = "1"
JOURNAL = "journal"
SUMMARY = "summary.json"
TAGS_FILE = "tags.parquet"
REJECTS_FILE = "rejects.parquet"
PARTIAL_SCHEMA = pa.schema([f for f in TAGS_SCHEMA if f.name != "tag_weight"])
POST_COLUMNS = ["id", "tags_general", "tags_character", "tags_copyright", "tags_artist", "image_path"]


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


# --- tagging -------------------------------------------------------------------------------------
def _batches(folder: TaggerFolder, cfg: Any, items: list[tuple[int, Path]], backend) -> Iterator[BatchResult]:
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
    items = [(i, pool / rel) for i, rel in zip(ids, posts["image_path"].to_pylist())]
    rows, rejects = [], []
    for result in _batches(folder, cfg, items, backend):
        for key, probs in zip(result.keys, result.probs):
            if not np.all(np.isfinite(probs)):
                rejects.append({"id": key, "reason": "tagger_nan", "detail": "the tagger returned NaN/inf"})
                continue
            rows.append({"id": key, **merger.merge(probs, general[key], character[key])})
        for key, err in result.errors:
            rejects.append({"id": key, "reason": err.reason, "detail": err.detail[:500]})
    rows.sort(key=lambda r: r["id"])
    rejects.sort(key=lambda r: r["id"])
    return rows, rejects


def _shard_paths(journal: Path, k: int) -> tuple[Path, Path]:
    return journal / f"shard-{k:05d}.tags.parquet", journal / f"shard-{k:05d}.rejects.parquet"


# --- report --------------------------------------------------------------------------------------
def _counter_rows(counter: Counter, key: str, top: int, extra: dict | None = None) -> list[dict]:
    rows = []
    for name, n in counter.most_common(top):
        row = {key: name, "images": int(n)}
        if extra is not None:
            row["mean_prob"] = round(extra[name] / n, 4)
        rows.append(row)
    return rows


def _report(tags: pa.Table, rejects: pa.Table, weights, weight_cfg, concepts, meta: dict) -> tuple[dict, StageReport]:
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


# --- the stage -----------------------------------------------------------------------------------
def _meta(ctx: StageContext, folder: TaggerFolder, kind: str, device: str, input_size: int) -> dict:
    cfg = ctx.section
    weights_path = folder.onnx_path if kind == "onnx" else folder.weights_path
    return {
        "model_name": folder.name,
        "model_identity": sha256_file(str(weights_path)),  # ~1 s for the 350 MB real model, once per run
        "labels_sha256": sha256_file(str(folder.path / "selected_tags.csv")),
        "labels": len(folder.labels),
        "backend": kind,
        "device": device,
        "input_size": input_size,
        "thresholds": {
            "general": cfg.general_threshold, "character": cfg.character_threshold, "mode": cfg.mode,
            "character_mcut_floor": cfg.character_mcut_floor, "disagree_below": cfg.disagree_below,
        },
    }


def build(ctx: StageContext) -> StageResult:
    cfg = ctx.section
    summary_path = ctx.work / SUMMARY
    if summary_path.exists() and (ctx.work / TAGS_FILE).exists() and (ctx.work / REJECTS_FILE).exists():
        return _result_from_summary(ctx, json.loads(summary_path.read_text()))  # killed while cleaning up

    posts = read_posts(ctx.store, ctx.upstream["ingest"])
    if posts.num_rows == 0:
        raise StageError("the ingest output has no posts to tag; widen the ingest queries and rerun `fm run ingest`")
    folder = resolve_model(cfg.model, Path(ctx.cfg.runtime.cache_dir))
    if cfg.model.startswith("builtin:"):
        ctx.log.warning("tag: %s is a random tiny stand-in (demo/tests); set tag.model to a WD tagger folder "
                        "for real tags", cfg.model)
    kind = choose_backend(folder, cfg.backend, cfg.device)
    journal = ctx.work / JOURNAL
    journal.mkdir(parents=True, exist_ok=True)
    n_shards = (posts.num_rows + cfg.shard_size - 1) // cfg.shard_size
    pool = ctx.store.pool_dir()
    backend = None
    merger = Merger(folder.labels, MergeRules.from_config(cfg))
    for k in range(n_shards):
        tags_path, rejects_path = _shard_paths(journal, k)
        if rejects_path.exists() and tags_path.exists():
            continue  # journaled by an earlier (killed) run
        if backend is None:
            backend = load_backend(folder, kind, cfg.device, cfg.compile)
            ctx.log.info("tag: %s backend on %s, input %d px", backend.name, backend.device, backend.input_size)
        shard = posts.slice(k * cfg.shard_size, cfg.shard_size)
        rows, rejects = tag_shard(shard, pool, folder, cfg, backend, merger)
        write_table(rows_to_table(rows, PARTIAL_SCHEMA), tags_path, PARTIAL_SCHEMA)
        write_table(rows_to_table(rejects, REJECTS_SCHEMA), rejects_path, REJECTS_SCHEMA)  # the done mark
        ctx.progress((k + 1) / n_shards, f"tagged shard {k + 1}/{n_shards}")
        ctx.log.info("tag: shard %d/%d: %d tagged, %d rejected", k + 1, n_shards, len(rows), len(rejects))

    parts = [_shard_paths(journal, k) for k in range(n_shards)]
    tagged = pa.concat_tables([read_table(t, PARTIAL_SCHEMA) for t, _ in parts]).sort_by("id")
    rejects = pa.concat_tables([read_table(r, REJECTS_SCHEMA) for _, r in parts]).sort_by("id")
    if tagged.num_rows == 0:
        reasons = Counter(rejects["reason"].to_pylist())
        raise StageError(f"no image could be tagged ({dict(reasons)}); check the images under {pool} "
                         "or rerun `fm run ingest --force`")

    # Concepts of the final dataset: merged characters, artist/copyright from the posts table.
    meta_posts = posts.filter(pc.is_in(posts["id"], value_set=tagged["id"]))  # both sorted by id
    if meta_posts["id"].to_pylist() != tagged["id"].to_pylist():
        raise ContractError("tag journal does not match the ingest posts; rerun `fm run tag --force`")
    concepts = {
        "character": tagged["character"].to_pylist(),
        "artist": meta_posts["tags_artist"].to_pylist(),
        "copyright": meta_posts["tags_copyright"].to_pylist(),
    }
    weights = compute_weights(concepts, tagged["general"].to_pylist(), cfg.weight)
    final = tagged.append_column("tag_weight", pa.array(weights.weights.astype(np.float32), pa.float32()))
    write_table(final, ctx.work / TAGS_FILE, TAGS_SCHEMA)
    write_table(rejects, ctx.work / REJECTS_FILE, REJECTS_SCHEMA)

    device = backend.device if backend is not None else (resolve_device(cfg.device) if kind == "torch" else "cpu")
    size = backend.input_size if backend is not None else int(folder.config_input_size or 0)
    meta = _meta(ctx, folder, kind, device, size)
    stats, report = _report(final, rejects, weights, cfg.weight, concepts, meta)
    summary = {"row_counts": {"tags": final.num_rows, "rejects": rejects.num_rows}, "stats": stats,
               "meta": meta, "report": {"summary_md": report.summary_md, "tables": report.tables}}
    atomic_write_text(summary_path, json.dumps(summary, indent=1, default=str))
    shutil.rmtree(journal, ignore_errors=True)
    return _result_from_summary(ctx, summary)


def _result_from_summary(ctx: StageContext, summary: dict) -> StageResult:
    shutil.rmtree(ctx.work / JOURNAL, ignore_errors=True)
    meta = summary["meta"]
    return StageResult(
        row_counts=summary["row_counts"],
        stats=summary["stats"],
        manifest_fields={"model_name": meta["model_name"], "model_identity": meta["model_identity"],
                         "backend": meta["backend"], "thresholds": meta["thresholds"]},
        report=StageReport(summary_md=summary["report"]["summary_md"], tables=summary["report"]["tables"]),
    )


def fingerprint_extra(cfg) -> dict:
    """The tagger files the config names by path: replacing them in place must rerun the stage."""
    from tasks.models.identity import file_identity

    folder = resolve_model(cfg.tag.model, Path(cfg.runtime.cache_dir))
    cache = Path(cfg.runtime.cache_dir)
    files = [p for p in (folder.weights_path, folder.onnx_path, folder.path / "selected_tags.csv") if p]
    return {p.name: file_identity(p, cache) for p in files}


SPEC = StageSpec(name="tag", upstream=("ingest",), code_version=CODE_VERSION, build=build, resumable=True,
                 fingerprint_extra=fingerprint_extra)
