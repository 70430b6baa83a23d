"""Latents an earlier cache output already holds: kept after an ingest update instead of encoded again.

A sample's latent depends on its image file, its geometry (bucket, resize, crop box, flip) and how it was
encoded: the VAE weights, the encoding code (ENCODE_VERSION), store_std, the decode path (PIL, or nvJPEG + GPU
resize), the device type and compile. A complete earlier cache output with the same encoding identity
(`latent_identity`, kept in its manifest's stats) lends its bytes to every sample whose id, image (the pool path:
it holds the md5) and geometry are unchanged since. `plan_reuse` marks those samples with `reuse_file` (that
output's chunk file) and `reuse_row` (the row in it); the caching loop (pipeline._Pass) reads those rows in its
reading threads instead of decoding and encoding the images, so they never reach the device. Captions, tokens,
label and weight always come from this run's upstream outputs. The chunk plan does not change, so the output is
the one a run without anything to reuse writes (the latents bit for bit where the encoder gives the same bytes
for an image whatever batch it is in).

The earlier output is the current cache output, else the newest one with the same identity; its bucket and ingest
outputs must still exist (they give the geometry and image of its rows). Only on a local data root: the workers of a
sharded run on other machines could not read the earlier chunks, so on object storage everything is encoded.
`cache.reuse: false` turns it off (it is not part of the fingerprint: the output is the same either way).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_contracts.bucket import BUCKETS_SCHEMA
from data_contracts.cache import CacheManifest
from data_contracts.errors import BooruflowError
from data_contracts.ingest import POSTS_SCHEMA
from data_contracts.store import ArtifactStore
from tasks.cache.chunks import LATENT_COLUMNS
from tasks.cache.encode import resolve_device
from tasks.cache.reader import latent_view
from tasks.common.earlier import complete_outputs, current_then_newest
from tasks.common.stage import StageContext
from tasks.common.upstream import read_upstream

# Bump when a change alters the latent written for the same image, geometry and VAE (decode, resize, encoder call).
ENCODE_VERSION = "1"
IDENTITY_KEY = "latent_identity"  # in a cache manifest's stats
REUSE_FILE, REUSE_ROW = "reuse_file", "reuse_row"  # samples columns; null: encode this sample
GEOMETRY_KEYS = ("bucket_w", "bucket_h", "resize_w", "resize_h", "crop_left", "crop_top", "crop_right",
                 "crop_bottom", "flip")


def latent_identity(ctx: StageContext, vae_id: str) -> dict[str, Any]:
    """What makes two cache runs write the same latent for the same image and geometry."""
    from tasks.cache.pipeline import decode_backend  # lazy: pipeline imports this module's caller

    section = ctx.section
    device = resolve_device(ctx.cfg.runtime.device)
    return {"encode_version": ENCODE_VERSION, "vae_identity": vae_id, "store_std": section.store_std,
            "decode": decode_backend(section.decode, device), "device": device.type, "compile": section.compile}


def reuse_source(ctx: StageContext, identity: dict[str, Any]) -> CacheManifest | None:
    """The earlier cache output to take latents from: the current one, else the newest, of the same identity."""
    found = [m for m in complete_outputs(ctx.store, CacheManifest, exclude=ctx.fingerprint)
             if m.stats.get(IDENTITY_KEY) == identity and {"bucket", "ingest"} <= set(m.upstream)]
    return next(iter(current_then_newest(ctx.store, found)), None)


def _earlier_rows(store: ArtifactStore, source: CacheManifest) -> tuple[pa.Table, list[str]]:
    """(id, image, geometry, file index, row) of every row of `source`'s chunks, sorted by id; the chunk files."""
    from data_contracts.bucket import BucketManifest
    from data_contracts.ingest import IngestManifest

    files = [str(store.path(source, c.path, verify=False)) for c in source.chunks]
    ids, file_index, rows = [], [], []
    for k, f in enumerate(files):
        got = pq.read_table(f, columns=["id"])["id"].to_numpy()
        ids.append(got)
        file_index.append(np.full(len(got), k, np.int32))
        rows.append(np.arange(len(got), dtype=np.int32))
    held = pa.table({"id": np.concatenate(ids) if ids else np.zeros(0, np.int64),
                     "file": np.concatenate(file_index) if ids else np.zeros(0, np.int32),
                     "row": np.concatenate(rows) if ids else np.zeros(0, np.int32)})
    bucket = store.read_manifest(BucketManifest, source.upstream["bucket"])
    ingest = store.read_manifest(IngestManifest, source.upstream["ingest"])
    geometry = read_upstream(store, bucket, "buckets", BUCKETS_SCHEMA, ["id", *GEOMETRY_KEYS])
    geometry = geometry.set_column(geometry.column_names.index("flip"), "flip", pc.fill_null(geometry["flip"], False))
    posts = read_upstream(store, ingest, "posts", POSTS_SCHEMA, ["id", "image_path"])
    table = held.join(geometry, "id", join_type="inner").join(posts, "id", join_type="inner")
    return table.sort_by("id"), files


def plan_reuse(ctx: StageContext, samples: pa.Table, vae_id: str) -> tuple[pa.Table, dict[str, Any]]:
    """The samples with `reuse_file` / `reuse_row` added (null where the sample is encoded), and what was found
    ({} when nothing could be reused: no earlier output, reuse off, object storage)."""
    n = samples.num_rows
    nothing = (samples.append_column(REUSE_FILE, pa.nulls(n, pa.string()))
               .append_column(REUSE_ROW, pa.nulls(n, pa.int32())), {})
    if not ctx.section.reuse or not ctx.store.is_local or n == 0:
        return nothing
    identity = latent_identity(ctx, vae_id)
    source = reuse_source(ctx, identity)
    if source is None:
        return nothing
    try:
        earlier, files = _earlier_rows(ctx.store, source)
    except (BooruflowError, OSError, pa.ArrowException) as exc:  # its upstream is gone, a chunk is unreadable
        ctx.log.info("cache: not reusing latents of %s (%s)", source.fingerprint, exc)
        return nothing
    e_ids = earlier["id"].to_numpy()
    if len(e_ids) == 0:
        return nothing
    ids = samples["id"].to_numpy()
    pos = np.minimum(np.searchsorted(e_ids, ids), len(e_ids) - 1)
    same = e_ids[pos] == ids
    taken = earlier.take(pa.array(pos))
    for name in ("image", *GEOMETRY_KEYS):
        theirs = taken["image_path" if name == "image" else name]
        same &= pc.fill_null(pc.equal(samples[name], theirs), False).to_numpy(zero_copy_only=False)
    file_col = pa.array([files[k] if ok else None for k, ok in zip(taken["file"].to_numpy(), same)], pa.string())
    row_col = pa.array(np.where(same, taken["row"].to_numpy(), 0), pa.int32(), mask=~same)
    found = {"rows": int(same.sum()), "from": source.fingerprint}
    ctx.log.info("cache: %d of %d latents kept from %s (same VAE and encoding, same image and geometry)",
                 found["rows"], n, source.fingerprint)
    return samples.append_column(REUSE_FILE, file_col).append_column(REUSE_ROW, row_col), found


def read_latents(path: str, rows: np.ndarray, store_std: bool) -> list[np.ndarray]:
    """[mean] or [mean, std] of the given rows (sorted or not) of one chunk file, each [n, values] fp16; only the
    row groups holding them are read."""
    meta = pq.read_metadata(path)
    starts = np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
    group_of = np.searchsorted(starts, rows, side="right") - 1
    groups = np.unique(group_of)
    columns = list(LATENT_COLUMNS if store_std else LATENT_COLUMNS[:1])
    table = pq.ParquetFile(path).read_row_groups(groups.tolist(), columns=columns)
    base = np.concatenate([[0], np.cumsum(starts[groups + 1] - starts[groups])[:-1]])  # each group's first row
    local = base[np.searchsorted(groups, group_of)] + rows - starts[group_of]
    out = []
    for name in columns:
        col = table[name].take(pa.array(local))
        values = len(col[0].as_buffer()) // 2 if len(col) else 0  # one bucket: every row the same size
        out.append(latent_view(col, (values,), f"{path} ({name})").copy())
    return out


def located(samples_cols: dict, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split sample rows into (to encode, to read from an earlier output)."""
    if REUSE_FILE not in samples_cols:
        return rows, rows[:0]
    files = samples_cols[REUSE_FILE]
    reuse = np.array([files[r] is not None for r in rows], bool)
    return rows[~reuse], rows[reuse]


def read_reused(samples_cols: dict, rows: np.ndarray, store_std: bool) -> tuple[np.ndarray, list[np.ndarray]]:
    """(rows, [mean, std?]) for sample rows that reuse an earlier output's latents, file by file."""
    files = np.array([samples_cols[REUSE_FILE][r] for r in rows], object)
    at = np.array([samples_cols[REUSE_ROW][r] for r in rows], np.int64)
    parts, got_rows = [], []
    for path in dict.fromkeys(files):  # each chunk file once, in first-seen order
        idx = np.flatnonzero(files == path)
        parts.append(read_latents(path, at[idx], store_std))
        got_rows.append(rows[idx])
    if not parts:
        return rows[:0], []
    return np.concatenate(got_rows), [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]

