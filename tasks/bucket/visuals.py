"""Bucket pictures: per bucket, thumbnails of the resized image with the crop box drawn on it.

(The aspect-ratio histogram is written by the stage itself: tasks/bucket/stage.py plot_histogram.)
Inputs: the buckets table (data_contracts/bucket.py BUCKETS_SCHEMA), the ingest posts table (id,
image_path) and the image pool (`store.pool_dir()`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from tasks.common.visuals import (BOX, MUTED, THUMB, Line, Tile, contact_sheet, fit_size, letterbox, open_rgb, pick,
                                  save_png)

_COLUMNS = ("id", "width", "height", "bucket_w", "bucket_h", "resize_w", "resize_h",
            "crop_left", "crop_top", "crop_right", "crop_bottom", "flip")


def crop_preview(path: Path, row: dict, size: int = THUMB) -> Image.Image | None:
    """The image resized as the cache resizes it (resize_w x resize_h, scaled to fit `size`), the
    part cropped away dimmed and the crop box outlined; letterboxed to size x size."""
    img = open_rgb(path, draft=(size * 2, size * 2))
    if img is None:
        return None
    tw, th = fit_size(row["resize_w"], row["resize_h"], size)
    img = img.resize((tw, th), Image.Resampling.BICUBIC)
    sx, sy = tw / row["resize_w"], th / row["resize_h"]
    box = (round(row["crop_left"] * sx), round(row["crop_top"] * sy),
           round(row["crop_right"] * sx) - 1, round(row["crop_bottom"] * sy) - 1)
    dim = Image.blend(img, Image.new("RGB", img.size, (0, 0, 0)), 0.55)
    dim.paste(img.crop((box[0], box[1], box[2] + 1, box[3] + 1)), box[:2])
    draw = ImageDraw.Draw(dim)
    draw.rectangle(box, outline=BOX, width=2)
    return letterbox(dim, size)


def make_bucket_sheets(
    buckets: pa.Table,
    posts: pa.Table,
    pool: Path,
    out_dir: Path,
    *,
    seed: int = 0,
    max_items: int = 16,
    max_buckets: int = 12,
    thumb: int = THUMB,
) -> dict[str, str]:
    """One sheet per bucket (the `max_buckets` fullest): up to max_items samples chosen by seed, each
    the resized image with its crop box (flip noted in the caption; the preview is not flipped)."""
    if buckets.num_rows == 0:
        return {}
    paths = dict(zip(posts.column("id").to_pylist(), posts.column("image_path").to_pylist()))
    cols = {c: buckets.column(c).to_numpy(zero_copy_only=False) for c in _COLUMNS}
    keys = cols["bucket_w"].astype(np.int64) * 100_000 + cols["bucket_h"].astype(np.int64)
    uniq, counts = np.unique(keys, return_counts=True)
    order = sorted(range(len(uniq)), key=lambda i: (-counts[i], uniq[i]))[:max_buckets]
    images: dict[str, str] = {}
    for i in order:
        bw, bh = int(uniq[i] // 100_000), int(uniq[i] % 100_000)
        rows = np.flatnonzero(keys == uniq[i])
        chosen = np.sort(rows[pick(cols["id"][rows], max_items, seed)])
        tiles = []
        for r in chosen:
            row = {c: (bool(cols[c][r]) if c == "flip" else int(cols[c][r])) for c in _COLUMNS}
            path = paths.get(row["id"])
            kept = (bw * bh) / max(1, row["resize_w"] * row["resize_h"])
            tiles.append(Tile(crop_preview(Path(pool) / path, row, thumb) if path else None,
                              [f"#{row['id']}{' · flipped' if row['flip'] else ''}",
                               Line(f"{row['width']}x{row['height']} -> {row['resize_w']}x{row['resize_h']}, "
                                    f"keeps {kept:.0%}", MUTED)]))
        title = (f"bucket {bw}x{bh}: {len(chosen)} of {counts[i]} samples (seed {seed}); "
                 "resized image, crop box outlined, cropped-away part dimmed")
        images[f"bucket {bw}x{bh}"] = save_png(contact_sheet(tiles, title, thumb=thumb, caption_rows=3), out_dir,
                                               f"bucket-{bw}x{bh}")
    return images
