"""Edits of a mini-booru's posts as Danbooru's users and moderators make them (for update tests and demos).

Pure functions on post records (API dicts); `MiniBooruServer` applies them to the posts it serves
(`upload`, `retag`, `delete`, `ban`, `expunge`), in memory only: the generated folder is never written.

As on Danbooru: every edit sets `updated_at` to now (so `order:change` lists the post first); an upload gets the
next id and created_at = updated_at = now; a tag edit rewrites tag_string and the per-category strings and counts;
a deletion sets is_deleted (the post is still returned unless a search excludes it); a ban hides the file fields
from the viewer; an expunge removes the post and its file entirely.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Mapping

from .generate import TAG_CATEGORY, _iso, generate_minibooru, hide_file_fields

CATEGORY_NAMES = {num: name for name, num in TAG_CATEGORY.items()}


def now_iso(now: datetime | None = None) -> str:
    """Danbooru's timestamp format (US Eastern offset) of `now` (default: the current time)."""
    return _iso(now or datetime.now(timezone.utc))


def retag(post: dict, add: Iterable[str] = (), remove: Iterable[str] = (), rating: str | None = None,
          categories: Mapping[str, int] | None = None, now: datetime | None = None) -> dict:
    """A copy of `post` with tags added/removed (a new tag's category from `categories`, else general, as Danbooru
    creates unknown tags) and optionally a new rating."""
    categories = categories or {}
    out = dict(post)
    by_cat = {cat: [t for t in post.get(f"tag_string_{cat}", "").split()] for cat in TAG_CATEGORY}
    drop = set(remove)
    for cat in by_cat:
        by_cat[cat] = [t for t in by_cat[cat] if t not in drop]
    have = {t for tags in by_cat.values() for t in tags}
    for tag in add:
        if tag not in have:
            by_cat[CATEGORY_NAMES.get(categories.get(tag, 0), "general")].append(tag)
            have.add(tag)
    for cat, tags in by_cat.items():
        out[f"tag_string_{cat}"] = " ".join(sorted(tags))
        out[f"tag_count_{cat}"] = len(tags)
    out["tag_string"] = " ".join(sorted(have))
    out["tag_count"] = len(have)
    if rating is not None:
        out["rating"] = rating
    out["updated_at"] = now_iso(now)
    return out


def delete(post: dict, now: datetime | None = None) -> dict:
    return {**post, "is_deleted": True, "is_pending": False, "is_flagged": False, "updated_at": now_iso(now)}


def ban(post: dict, now: datetime | None = None) -> dict:
    return hide_file_fields({**post, "is_banned": True, "updated_at": now_iso(now)})


def as_upload(post: dict, new_id: int, now: datetime | None = None) -> dict:
    """A record uploaded now under `new_id`: fresh dates, no parent/child links (they named the other booru)."""
    stamp = now_iso(now)
    out = {**post, "id": new_id, "created_at": stamp, "updated_at": stamp, "parent_id": None,
           "has_children": False, "has_active_children": False, "has_visible_children": False}
    if isinstance(out.get("media_asset"), dict):
        out["media_asset"] = {**out["media_asset"], "created_at": stamp, "updated_at": stamp}
    return out


def fresh_posts(workdir: Path, n: int, seed: int, max_side: int = 256) -> list[tuple[dict, bytes | None]]:
    """n new posts to upload (record, original file bytes or None for a hidden post): a small booru generated
    with another seed, so the pictures, characters and tags are as realistic as the served ones."""
    booru = generate_minibooru(Path(workdir), n, seed, max_side=max_side)
    out = []
    for post in booru.load_posts():
        md5 = post.get("md5")
        data = booru.image_path(md5, post["file_ext"]).read_bytes() if md5 else None
        out.append((json.loads(json.dumps(post)), data))
    return out


__all__ = ["as_upload", "ban", "delete", "fresh_posts", "now_iso", "retag"]
