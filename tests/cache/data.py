"""Upstream outputs for cache tests: real images in the pool, real Parquet, real manifests.

`make_upstream` commits ingest/tag/quality/bucket outputs for a handful of procedural images in three
64-multiple buckets, including the bad cases the stage must turn into rejects: a missing file, a
corrupt file, a PNG with alpha, and a bucketed id missing from the quality output.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from data_contracts.bucket import BUCKETS_SCHEMA, BucketManifest
from data_contracts.cache import CacheManifest
from data_contracts.ingest import POSTS_SCHEMA, IngestManifest
from data_contracts.quality import QUALITY_LABELS, QUALITY_SCHEMA, QualityManifest
from data_contracts.store import ArtifactStore
from data_contracts.tag import TAGS_SCHEMA, TagManifest
from pipeline_config.schema import PipelineConfig
from tests.stage_helpers import commit_output

BUCKETS = [(64, 64), (128, 64), (64, 128)]
CHARACTERS = ["hatsune_miku", "iseri_nina", "kawaragi_momoka_(girls_band_cry)"]
SERIES = ["vocaloid", "girls_band_cry", "girls_band_cry"]


@dataclass
class Upstream:
    ids: list[int]  # every bucketed id
    good: list[int]  # ids that should end up cached
    rejects: dict[int, str]  # id -> expected reason


def picture(w: int, h: int, seed: int) -> Image.Image:
    """Smooth gradients + a disc: structure the VAE can encode, different per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(40, 200, 3)
    img = np.stack([base[c] + 50 * np.sin(x / (7 + 3 * c + seed % 5)) + 40 * np.cos(y / (9 + c)) for c in range(3)], -1)
    cx, cy, r = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h, min(w, h) / 4
    img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def geometry(w: int, h: int, bw: int, bh: int) -> dict:
    """Resize-to-cover then centre crop, as the bucket stage defines it."""
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    left, top = (rw - bw) // 2, (rh - bh) // 2
    return {"resize_w": rw, "resize_h": rh, "crop_left": left, "crop_top": top,
            "crop_right": left + bw, "crop_bottom": top + bh}


def make_upstream(store: ArtifactStore, n: int = 24, *, seed: int = 0, bad: bool = True) -> Upstream:
    pool = store.pool_dir()
    rng = np.random.default_rng(seed)
    posts, tags, quality, buckets = [], [], [], []
    rejects: dict[int, str] = {}
    ids = []
    for i in range(n):
        pid = 1000 + i
        ids.append(pid)
        bw, bh = BUCKETS[i % len(BUCKETS)]
        w = int(bw * rng.uniform(1.0, 1.6))
        h = int(bh * rng.uniform(1.0, 1.6))
        kind = "png" if i == 4 else "jpg"
        rel = f"images/{pid % 100:02d}/{pid}.{kind}"
        path = pool / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        img = picture(w, h, seed * 1000 + i)
        if kind == "png":  # RGBA with a transparent half: composited onto white
            rgba = img.convert("RGBA")
            alpha = np.full((h, w), 255, np.uint8)
            alpha[:, : w // 2] = 0
            rgba.putalpha(Image.fromarray(alpha))
            rgba.save(path)
        else:
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=92)
            path.write_bytes(buf.getvalue())
        if bad and i == 5:
            path.unlink()
            rejects[pid] = "image_missing"
        if bad and i == 6:
            path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
            rejects[pid] = "decode_error"
        c = i % len(CHARACTERS)
        general = ["smile", "long_hair", "1girl", "solo", "blue_eyes" if i % 2 else "red_eyes", "^_^"]
        posts.append({
            "id": pid, "md5": f"{pid:032x}", "score": int(rng.integers(0, 100)), "rating": "gsqe"[i % 4],
            "width": w, "height": h, "file_ext": kind, "file_size": path.stat().st_size if path.exists() else 0,
            "tags_general": general, "tags_character": [CHARACTERS[c]], "tags_copyright": [SERIES[c]],
            "tags_artist": [f"artist_{i % 3}"], "tags_meta": ["highres", "commentary_request"],
            "image_path": rel, "query": "test",
        })
        tags.append({"id": pid, "general": general, "character": [CHARACTERS[c]], "added": [], "disputed": [],
                     "rating_probs": [0.7, 0.1, 0.1, 0.1], "rating": "general",
                     "tag_weight": float(0.5 + (i % 4) * 0.25)})
        if not (bad and i == 7):
            quality.append({"id": pid, "year": 2020, "norm_score": 0.5, "label": QUALITY_LABELS[i % 4],
                            "cluster": i % 4})
        else:
            rejects[pid] = "missing_upstream"
        buckets.append({"id": pid, "width": w, "height": h, "bucket_w": bw, "bucket_h": bh,
                        **geometry(w, h, bw, bh), "flip": i % 5 == 3})
    fp = f"s{seed}n{n}{'b' if bad else ''}"
    ing = commit_output(store, IngestManifest,
                        {"posts.parquet": (pa.Table.from_pylist(posts, POSTS_SCHEMA), POSTS_SCHEMA)},
                        fields={"source": "danbooru_dump"}, fingerprint="ing" + fp)
    tag = commit_output(store, TagManifest, {"tags.parquet": (pa.Table.from_pylist(tags, TAGS_SCHEMA), TAGS_SCHEMA)},
                        fields={"model_name": "test", "model_identity": "0" * 64, "backend": "onnx", "thresholds": {}},
                        upstream={"ingest": ing.fingerprint}, fingerprint="tag" + fp)
    qual = commit_output(store, QualityManifest,
                         {"quality.parquet": (pa.Table.from_pylist(quality, QUALITY_SCHEMA), QUALITY_SCHEMA)},
                         fields={"method": "percentile"}, upstream={"tag": tag.fingerprint}, fingerprint="qua" + fp)
    commit_output(store, BucketManifest,
                  {"buckets.parquet": (pa.Table.from_pylist(buckets, BUCKETS_SCHEMA), BUCKETS_SCHEMA)},
                  fields={"buckets": BUCKETS}, upstream={"quality": qual.fingerprint}, fingerprint="buc" + fp)
    return Upstream(ids=ids, good=[i for i in ids if i not in rejects], rejects=rejects)


def cache_config(root: Path, model_cache: Path, **cache: object) -> PipelineConfig:
    section = {"chunk_target_mb": 0.004, "row_group_mb": 0.002, "batch_size": 4, **cache}
    return PipelineConfig.model_validate({
        "data_root": str(root), "runtime": {"device": "cpu", "cache_dir": str(model_cache), "max_workers": 2},
        "cache": section,
    })


def latent_rows(mean_bytes: bytes, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(mean_bytes, np.float16).reshape(shape)


def ceil_div(a: int, b: int) -> int:
    return math.ceil(a / b)


def make_cache(store: ArtifactStore, sizes: dict[tuple[int, int], int], *, rows_per_chunk: int = 10,
               rows_per_group: int = 4, store_std: bool = True, fingerprint: str = "cachetest") -> CacheManifest:
    """A cache output written with the stage's own chunk writer, without a VAE: latent values encode the
    sample id (mean = id, std = id / 1000 in every cell) so tests can check rows and shapes."""
    from data_contracts.cache import SEGMENTS, CacheManifest
    from tasks.cache.chunks import ChunkPlan, chunk_table, write_chunk

    work = store.begin("cache", fingerprint, resume=False)
    chunks = []
    next_id = 1
    for (w, h), n in sizes.items():
        ids = np.arange(next_id, next_id + n, dtype=np.int64)
        next_id += n + 100
        for part, start in enumerate(range(0, n, rows_per_chunk)):
            sub = ids[start : start + rows_per_chunk]
            k = len(sub)
            meta = {"id": sub, "bucket_w": [w] * k, "bucket_h": [h] * k, "flip": [False] * k,
                    "quality_label": [QUALITY_LABELS[int(i) % 4] for i in sub],
                    "tag_weight": (sub % 7 + 1).astype(np.float32) / 4}
            for seg in SEGMENTS:
                meta[f"tags_{seg}"] = [[f"{seg}_{i}", "x"] for i in sub]
                meta[f"tokens_{seg}"] = [[[int(i), 1], [2]] for i in sub]
                meta[f"tokens_sep_{seg}"] = [[[int(i), 1, 267], [2, 267]] for i in sub]
            shape = (k, 4, h // 8, w // 8)
            mean = np.broadcast_to(sub[:, None, None, None], shape).astype(np.float16)
            std = (mean / 1000).astype(np.float16) if store_std else None
            plan = ChunkPlan((w, h), part, 0, k, rows_per_group, "test")
            chunks.append(write_chunk(work, plan, chunk_table(pa.table(meta), mean, std)))
    manifest = CacheManifest(
        stage="cache", contract_version=CacheManifest.CONTRACT_VERSION, fingerprint=fingerprint, config_digest="t",
        code_version="t", vae_identity="v" * 64, tokenizer_identity="t" * 64, scaling_factor=0.18215,
        stores_std=store_std, chunks=chunks, row_counts={"chunks": sum(c.rows for c in chunks)})
    return store.commit(manifest, work)
