"""Small real inputs: images in a pool folder and contract-schema tables that point at them."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from data_contracts.bucket import BUCKETS_SCHEMA
from data_contracts.ingest import POSTS_SCHEMA, REJECTS
from data_contracts.quality import QUALITY_LABELS, QUALITY_SCHEMA
from data_contracts.tables import read_table, write_table
from data_contracts.tag import TAGS_SCHEMA

# (width, height) of the test images: portrait, landscape, square, very wide
SIZES = [(96, 128), (160, 96), (112, 112), (192, 64), (80, 120), (128, 96), (104, 104), (144, 80)]
CHARACTERS = ["hatsune_miku", "hatsune_miku", "hatsune_miku", "kagamine_rin", "kagamine_rin", "",
              "hatsune_miku", "megurine_luka_(append)"]


def make_image(i: int, width: int, height: int) -> Image.Image:
    """A picture with structure: a diagonal split of two colours, a disc and a gradient stripe."""
    rng = np.random.default_rng(100 + i)
    c1, c2, c3 = (rng.integers(0, 256, 3) for _ in range(3))
    yy, xx = np.mgrid[0:height, 0:width]
    stripes = (xx * (1 + i % 3) + yy * (2 - i % 2)) % (width + height) < (width + height) / 2
    img = np.where(stripes[..., None], c1, c2)
    cx, cy = rng.integers(width // 4, 3 * width // 4), rng.integers(height // 4, 3 * height // 4)
    r = min(width, height) // 5
    img = np.where((((xx - cx) ** 2 + (yy - cy) ** 2) < r * r)[..., None], c3, img)
    img[: height // 8] = (np.linspace(0, 255, width)[:, None] * np.ones(3)).astype(np.uint8)
    return Image.fromarray(img.astype(np.uint8), "RGB")


def write_pool(pool: Path) -> list[dict]:
    """Write the images (JPEG, PNG, one RGBA PNG) into pool/images/..; returns post rows."""
    rows = []
    for i, (w, h) in enumerate(SIZES):
        img = make_image(i, w, h)
        ext = "jpg" if i % 2 == 0 else "png"
        md5 = f"{i:02d}" + "ab" * 15
        rel = f"images/{md5[:2]}/{md5}.{ext}"
        (pool / rel).parent.mkdir(parents=True, exist_ok=True)
        if i == 3:  # with alpha: visuals composite it onto white like the cache does
            img.putalpha(200)
        img.save(pool / rel, quality=95) if ext == "jpg" else img.save(pool / rel)
        char = CHARACTERS[i]
        rows.append({
            "id": 1000 + i, "md5": md5, "created_at": dt.datetime(2020 + i % 3, 1, 1, tzinfo=dt.timezone.utc),
            "score": 10 * i - 5, "up_score": 10 * i, "down_score": -5, "fav_count": i, "rating": "g",
            "width": w, "height": h, "file_ext": ext, "file_size": (pool / rel).stat().st_size, "source": "",
            "parent_id": None, "tags_general": ["1girl", "solo"], "tags_character": [char] if char else [],
            "tags_copyright": ["vocaloid"] if char else ["original"], "tags_artist": [], "tags_meta": [],
            "image_path": rel, "query": "vocaloid",
        })
    return rows


def roundtrip(table: pa.Table, schema: pa.Schema, path: Path) -> pa.Table:
    """Write and read back through the contract helpers (real Parquet, schema-checked)."""
    write_table(table, path, schema)
    return read_table(path, schema)


def posts_table(rows: list[dict], tmp: Path) -> pa.Table:
    return roundtrip(pa.Table.from_pylist(rows, schema=POSTS_SCHEMA), POSTS_SCHEMA, tmp / "posts.parquet")


def rejects_table(tmp: Path) -> pa.Table:
    rows = [
        {"id": 1003, "reason": "duplicate_md5", "detail": "post 1001 has the same file", "query": "vocaloid"},
        {"id": 1005, "reason": "too_small", "detail": "128x96 below 256x256", "query": "vocaloid"},
        {"id": 7777, "reason": "timeout", "detail": "download timed out", "query": "vocaloid"},
    ]
    return roundtrip(pa.Table.from_pylist(rows, schema=REJECTS), REJECTS, tmp / "rejects.parquet")


def tags_table(post_rows: list[dict], tmp: Path) -> pa.Table:
    rows = []
    for i, p in enumerate(post_rows):
        added = [{"tag": "long_hair", "prob": 0.91}, {"tag": "twintails", "prob": 0.62}] if i % 2 == 0 else []
        disputed = [{"tag": "solo", "prob": 0.02 + 0.01 * i}] if i % 3 == 0 else []
        rows.append({"id": p["id"], "general": ["1girl", "solo"], "character": p["tags_character"], "added": added,
                     "disputed": disputed, "rating_probs": [0.9, 0.05, 0.03, 0.02], "rating": "general",
                     "tag_weight": 1.0})
    return roundtrip(pa.Table.from_pylist(rows, schema=TAGS_SCHEMA), TAGS_SCHEMA, tmp / "tags.parquet")


def quality_table(post_rows: list[dict], tmp: Path) -> pa.Table:
    n = len(post_rows)
    rows = []
    for i, p in enumerate(post_rows):
        cluster = min(3, i * 4 // n)
        rows.append({"id": p["id"], "year": p["created_at"].year, "norm_score": (i + 0.5) / n,
                     "label": QUALITY_LABELS[cluster], "cluster": cluster})
    return roundtrip(pa.Table.from_pylist(rows, schema=QUALITY_SCHEMA), QUALITY_SCHEMA, tmp / "quality.parquet")


def bucket_rows(post_rows: list[dict], side: int = 64) -> list[dict]:
    """Each image into a bucket of its rough orientation: resize to cover, centre crop, odd ids flipped."""
    rows = []
    for p in post_rows:
        w, h = p["width"], p["height"]
        if abs(w - h) < 0.15 * max(w, h):
            bw, bh = side, side
        else:
            bw, bh = (side + 16, side - 16) if w > h else (side - 16, side + 16)
        scale = max(bw / w, bh / h)
        rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
        left, top = (rw - bw) // 2, (rh - bh) // 2
        rows.append({"id": p["id"], "width": w, "height": h, "bucket_w": bw, "bucket_h": bh, "resize_w": rw,
                     "resize_h": rh, "crop_left": left, "crop_top": top, "crop_right": left + bw,
                     "crop_bottom": top + bh, "flip": p["id"] % 2 == 1})
    return rows


def buckets_table(post_rows: list[dict], tmp: Path, side: int = 64) -> pa.Table:
    table = pa.Table.from_pylist(bucket_rows(post_rows, side), schema=BUCKETS_SCHEMA)
    return roundtrip(table, BUCKETS_SCHEMA, tmp / "buckets.parquet")
