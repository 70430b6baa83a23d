"""Write a generated mini-booru as an offline Danbooru dump (Danbooru2021 / danbooru2023 style).

Layout of `write_dump(booru_dir, out_dir, fmt=..., images=...)`:

    out_dir/
      metadata/posts-00000.jsonl     fmt="jsonl": one post record per line (JSON Lines), ids ascending,
      metadata/posts-00000.parquet   fmt="parquet": the same records as Parquet (schema POST_PARQUET_SCHEMA:
                                     every top-level post field as a column, media_asset as a struct with
                                     its variants list; a field the API omits is null)
                                     `meta_shard_size` posts per file (default 10,000)
      images/<md5>.<ext>             images="folder": one file per post that has an image
      images-00000.tar               images="tar": tar shards with members named "<id>.<ext>", ids ascending,
                                     `shard_size` posts per shard (a shard may hold fewer images than posts)
      dump.json                      written last: {"format": "minibooru-dump", "version": 1, "metadata_format",
                                     "images", "n_posts", "n_images", "metadata": [paths], "image_shards": [paths]}

Post records are exactly the API records (same field set, same names and types); file_url / large_file_url /
preview_file_url / variant urls stay host-relative ("/data/original/ab/cd/<md5>.jpg") unless `base_url` is
given. Hidden posts (banned / restricted) have no md5 and no image, deleted posts keep theirs; videos, ugoira
and flash (mp4 / zip / swf) have records but no file in the dump, like the public image dumps.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

from .generate import MARKER, MiniBooru

IMAGE_EXTS = ("jpg", "png", "webp", "gif", "avif")
DUMP_MARKER = "dump.json"

_VARIANT = pa.struct([("type", pa.string()), ("url", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
                      ("file_ext", pa.string())])
_MEDIA_ASSET = pa.struct([
    ("id", pa.int64()), ("created_at", pa.string()), ("updated_at", pa.string()), ("md5", pa.string()),
    ("file_ext", pa.string()), ("file_size", pa.int64()), ("image_width", pa.int64()), ("image_height", pa.int64()),
    ("duration", pa.float64()), ("status", pa.string()), ("file_key", pa.string()), ("is_public", pa.bool_()),
    ("pixel_hash", pa.string()), ("variants", pa.list_(_VARIANT)),
])
_I, _S, _B = pa.int64(), pa.string(), pa.bool_()
POST_PARQUET_SCHEMA = pa.schema([
    ("id", _I), ("created_at", _S), ("uploader_id", _I), ("score", _I), ("source", _S), ("md5", _S),
    ("last_comment_bumped_at", _S), ("rating", _S), ("image_width", _I), ("image_height", _I), ("tag_string", _S),
    ("fav_count", _I), ("file_ext", _S), ("last_noted_at", _S), ("parent_id", _I), ("has_children", _B),
    ("approver_id", _I), ("tag_count_general", _I), ("tag_count_artist", _I), ("tag_count_character", _I),
    ("tag_count_copyright", _I), ("file_size", _I), ("up_score", _I), ("down_score", _I), ("is_pending", _B),
    ("is_flagged", _B), ("is_deleted", _B), ("tag_count", _I), ("updated_at", _S), ("is_banned", _B),
    ("pixiv_id", _I), ("last_commented_at", _S), ("has_active_children", _B), ("bit_flags", _I),
    ("tag_count_meta", _I), ("has_large", _B), ("has_visible_children", _B), ("media_asset", _MEDIA_ASSET),
    ("tag_string_general", _S), ("tag_string_character", _S), ("tag_string_copyright", _S),
    ("tag_string_artist", _S), ("tag_string_meta", _S), ("file_url", _S), ("large_file_url", _S),
    ("preview_file_url", _S),
])


def _absolute(post: dict, base: str) -> dict:
    p = json.loads(json.dumps(post))
    for k in ("file_url", "large_file_url", "preview_file_url"):
        if isinstance(p.get(k), str) and p[k].startswith("/"):
            p[k] = base + p[k]
    for v in (p.get("media_asset") or {}).get("variants") or []:
        if v["url"].startswith("/"):
            v["url"] = base + v["url"]
    return p


def write_dump(booru_dir: Path, out_dir: Path, *, fmt: Literal["jsonl", "parquet"] = "jsonl",
               images: Literal["folder", "tar"] = "folder", shard_size: int = 100, meta_shard_size: int = 10_000,
               base_url: str | None = None) -> Path:
    """Write the mini-booru in `booru_dir` as an offline dump in `out_dir`; returns out_dir."""
    booru_dir, out_dir = Path(booru_dir), Path(out_dir)
    if fmt not in ("jsonl", "parquet"):
        raise ValueError(f"fmt must be 'jsonl' or 'parquet', not {fmt!r}")
    if images not in ("folder", "tar"):
        raise ValueError(f"images must be 'folder' or 'tar', not {images!r}")
    if shard_size < 1 or meta_shard_size < 1:
        raise ValueError("shard sizes must be >= 1")
    if not (booru_dir / MARKER).exists():
        raise FileNotFoundError(f"{booru_dir} holds no complete mini-booru (no {MARKER})")
    booru = MiniBooru.open(booru_dir)
    posts = sorted(booru.load_posts(), key=lambda p: p["id"])
    if base_url:
        posts = [_absolute(p, base_url.rstrip("/")) for p in posts]

    marker = out_dir / DUMP_MARKER
    if marker.exists():
        marker.unlink()
    for old in ("metadata", "images"):
        if (out_dir / old).exists():
            shutil.rmtree(out_dir / old)
    for old in out_dir.glob("images-*.tar"):
        old.unlink()
    (out_dir / "metadata").mkdir(parents=True, exist_ok=True)

    meta_files: list[str] = []
    for k, start in enumerate(range(0, len(posts), meta_shard_size)):
        chunk = posts[start:start + meta_shard_size]
        rel = f"metadata/posts-{k:05d}.{fmt}"
        tmp = out_dir / (rel + ".tmp")
        if fmt == "jsonl":
            tmp.write_text("".join(json.dumps(p, separators=(",", ":")) + "\n" for p in chunk), encoding="utf-8")
        else:
            pq.write_table(pa.Table.from_pylist(chunk, schema=POST_PARQUET_SCHEMA), tmp)
        os.replace(tmp, out_dir / rel)
        meta_files.append(rel)

    def source(p: dict) -> Path | None:
        md5 = p.get("md5")
        if not md5 or p["file_ext"] not in IMAGE_EXTS:
            return None
        path = booru.image_path(md5, p["file_ext"])
        return path if path.exists() else None

    shards: list[str] = []
    n_images = 0
    if images == "folder":
        (out_dir / "images").mkdir()
        for p in posts:
            src = source(p)
            if src is not None:
                shutil.copyfile(src, out_dir / "images" / src.name)
                n_images += 1
    else:
        for k, start in enumerate(range(0, len(posts), shard_size)):
            rel = f"images-{k:05d}.tar"
            tmp = out_dir / (rel + ".tmp")
            with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
                for p in posts[start:start + shard_size]:
                    src = source(p)
                    if src is None:
                        continue
                    data = src.read_bytes()
                    info = tarfile.TarInfo(f"{p['id']}.{p['file_ext']}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tf.addfile(info, io.BytesIO(data))
                    n_images += 1
            os.replace(tmp, out_dir / rel)
            shards.append(rel)

    manifest = {"format": "minibooru-dump", "version": 1, "metadata_format": fmt, "images": images,
                "n_posts": len(posts), "n_images": n_images, "metadata": meta_files, "image_shards": shards,
                "shard_size": shard_size, "source": {"n_posts": booru.n_posts, "seed": booru.seed,
                                                     "max_side": booru.max_side}}
    tmp = out_dir / (DUMP_MARKER + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    os.replace(tmp, marker)
    return out_dir
