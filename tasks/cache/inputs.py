"""Join the upstream contracts into one table of samples to cache (one row per bucketed sample).

Samples are the bucket stage's rows; their image and Danbooru tags come from ingest, final general /
character tags and tag_weight from tag, the label from quality. A bucketed id missing from another
upstream output becomes a reject (`missing_upstream`) instead of a guess.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from data_contracts.bucket import BUCKETS_SCHEMA
from data_contracts.cache import CHUNK_SCHEMA
from data_contracts.ingest import POSTS_SCHEMA
from data_contracts.manifest import StageManifest
from data_contracts.quality import QUALITY_SCHEMA
from data_contracts.store import ArtifactStore
from data_contracts.tag import TAGS_SCHEMA
from pipeline_config.cache import CacheConfig
from tasks.cache.captions import TagTokenizer, caption_columns, segment_tags
from tasks.common.upstream import read_upstream

# Columns of the samples table besides the caption columns (tags_<seg>, tokens_<seg>).
GEOMETRY = ("width", "height", "bucket_w", "bucket_h", "resize_w", "resize_h",
            "crop_left", "crop_top", "crop_right", "crop_bottom")


def _index(ids: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row of every wanted id in ids (first occurrence) and whether it exists."""
    if len(ids) == 0:
        return np.zeros(len(wanted), np.int64), np.zeros(len(wanted), bool)
    order = np.argsort(ids, kind="stable")
    pos = np.minimum(np.searchsorted(ids[order], wanted), len(ids) - 1)
    return order[pos], ids[order][pos] == wanted


def load_samples(store: ArtifactStore, upstream: dict[str, StageManifest], cfg: CacheConfig,
                 tokens: TagTokenizer, fetch: bool = True) -> tuple[pa.Table, list[dict]]:
    """(samples sorted by bucket then id, reject rows). Image paths are absolute local paths, or with
    fetch=False pool-relative ones (nothing downloaded; `localize` a part of the table before reading it)."""
    buckets = read_upstream(store, upstream["bucket"], "buckets", BUCKETS_SCHEMA,
                            ["id", *GEOMETRY, "flip"])
    posts = read_upstream(store, upstream["ingest"], "posts", POSTS_SCHEMA,
                          ["id", "image_path", "rating", "tags_copyright", "tags_artist", "tags_meta"])
    tags = read_upstream(store, upstream["tag"], "tags", TAGS_SCHEMA,
                         ["id", "general", "character", "rating", "tag_weight"])
    quality = read_upstream(store, upstream["quality"], "quality", QUALITY_SCHEMA, ["id", "label"])

    ids = buckets.column("id").to_numpy()
    found = np.ones(len(ids), bool)
    rows = {}
    rejects: list[dict] = []
    for name, table in (("ingest", posts), ("tag", tags), ("quality", quality)):
        idx, ok = _index(table.column("id").to_numpy(), ids)
        rows[name] = (table, idx)
        for i in np.flatnonzero(found & ~ok):
            rejects.append({"id": int(ids[i]), "reason": "missing_upstream",
                            "detail": f"bucketed sample has no row in the {name} output"})
        found &= ok
    keep = np.flatnonzero(found)
    buckets = buckets.take(pa.array(keep))
    posts_t = posts.take(pa.array(rows["ingest"][1][keep]))
    tags_t = tags.take(pa.array(rows["tag"][1][keep]))
    quality_t = quality.take(pa.array(rows["quality"][1][keep]))

    p = posts_t.to_pydict()
    t = tags_t.to_pydict()
    labels = quality_t.column("label").to_pylist()
    raw = []
    for i in range(buckets.num_rows):
        rating = p["rating"][i] if cfg.rating_source == "danbooru" else t["rating"][i]
        raw.append(segment_tags(
            general=t["general"][i] or [], character=t["character"][i] or [], series=p["tags_copyright"][i] or [],
            artist=p["tags_artist"][i] or [], meta=p["tags_meta"][i] or [], rating=rating,
            quality_label=labels[i], cfg=cfg))
    weights = [1.0 if w is None else float(w) for w in t["tag_weight"]]
    columns = {
        "id": buckets.column("id"),
        "image": pa.array(p["image_path"], pa.string()),
        **{name: buckets.column(name) for name in GEOMETRY},
        "flip": buckets.column("flip").fill_null(False),
        "quality_label": quality_t.column("label"),
        "tag_weight": pa.array(weights, pa.float32()),
        **{k: pa.array(v, CHUNK_SCHEMA.field(k).type) for k, v in caption_columns(raw, tokens).items()},
    }
    table = pa.table(columns)
    order = np.lexsort((table.column("id").to_numpy(), table.column("bucket_h").to_numpy(),
                        table.column("bucket_w").to_numpy()))
    table = table.take(pa.array(order))
    return (localize(store, table) if fetch else table), rejects


def localize(store: ArtifactStore, samples: pa.Table) -> pa.Table:
    """The samples with pool-relative image paths made absolute local ones (the relative ones kept in
    `image_rel`). On object storage this downloads the images not yet in this machine's pool copy."""
    rels = samples.column("image").to_pylist()
    pool = store.pool_fetch(rels)
    index = samples.column_names.index("image")
    local = samples.set_column(index, "image", pa.array([str(Path(pool) / rel) for rel in rels], pa.string()))
    if "image_rel" in local.column_names:
        return local
    return local.append_column("image_rel", pa.array(rels, pa.string()))  # rejects name the image by it
