"""Danbooru post record (API JSON or dump row) -> a typed Post, tolerant of every field set seen in the wild.

Handles: the current API (with `media_asset`), the pre-2022 API (no media_asset, since-removed lock/pool
fields, rating "s" meaning safe), Danbooru20xx dumps (ids/numbers as strings, "t"/"f" booleans, a `tags`
list of {name, category} instead of `tag_string_*`, "YYYY-MM-DD HH:MM:SS UTC" dates), Parquet dumps
(datetime objects, numpy scalars, list columns) and nulls anywhere. Unknown fields are ignored.
"""
from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, fields
from typing import Any, Iterable, Mapping

CATEGORIES = ("general", "character", "copyright", "artist", "meta")
# Danbooru tag category ids (tags.json `category`, dump `tags[].category`).
CATEGORY_IDS = {0: "general", 1: "artist", 3: "copyright", 4: "character", 5: "meta"}
# Fields Danbooru removed around the 2022 rating change: their presence marks a legacy record.
LEGACY_FIELDS = ("is_note_locked", "is_rating_locked", "is_status_locked", "pool_string", "is_favorited")
RATING_WORDS = {"general": "g", "sensitive": "s", "questionable": "q", "explicit": "e", "safe": "s"}
_MD5 = re.compile(r"^[0-9a-f]{32}$")
_TRUE = {"t", "true", "1", "yes", "y"}


class ParseError(ValueError):
    """The record has no usable post id (nothing to key a row or a reject on)."""


@dataclass(frozen=True)
class Post:
    id: int
    md5: str | None
    created_at: dt.datetime | None  # UTC
    score: int | None
    up_score: int | None
    down_score: int | None
    fav_count: int | None
    rating: str | None  # g/s/q/e in the current meaning
    width: int | None
    height: int | None
    file_ext: str | None
    file_size: int | None
    source: str | None
    parent_id: int | None
    tags_general: tuple[str, ...]
    tags_character: tuple[str, ...]
    tags_copyright: tuple[str, ...]
    tags_artist: tuple[str, ...]
    tags_meta: tuple[str, ...]
    file_url: str | None
    is_deleted: bool
    is_banned: bool
    is_pending: bool
    is_flagged: bool

    def all_tags(self) -> Iterable[str]:
        for cat in CATEGORIES:
            yield from getattr(self, f"tags_{cat}")

    def row(self) -> dict[str, Any]:
        """The contract columns of posts.parquet (without image_path and query)."""
        out = {name: getattr(self, name) for name in _ROW_FIELDS}
        for cat in CATEGORIES:
            out[f"tags_{cat}"] = list(out[f"tags_{cat}"])
        return out

    def to_json(self) -> dict[str, Any]:
        """JSON-safe dict (journal lines); `from_json` is its inverse."""
        out = {name: getattr(self, name) for name in _FIELDS}  # not asdict(): it deep-copies (slow)
        out["created_at"] = self.created_at.isoformat() if self.created_at else None
        for cat in CATEGORIES:
            out[f"tags_{cat}"] = list(out[f"tags_{cat}"])
        return out

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> "Post":
        data = dict(raw)
        data["created_at"] = dt.datetime.fromisoformat(data["created_at"]) if data.get("created_at") else None
        for cat in CATEGORIES:
            data[f"tags_{cat}"] = tuple(data[f"tags_{cat}"])
        return cls(**data)


_FIELDS = tuple(f.name for f in fields(Post))
_ROW_FIELDS = tuple(n for n in _FIELDS if n not in ("file_url", "is_deleted", "is_banned", "is_pending", "is_flagged"))


def _scalar(value: Any) -> Any:
    """numpy / pyarrow scalars -> Python values."""
    if hasattr(value, "as_py"):
        return value.as_py()
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        return value.item()
    return value


def to_int(value: Any) -> int | None:
    value = _scalar(value)
    if value is None or isinstance(value, bool):
        return None if value is None else int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value == value and abs(value) != float("inf") else None
    if isinstance(value, (str, bytes)):
        text = value.decode() if isinstance(value, bytes) else value
        text = text.strip()
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                return None
            return int(number) if number == number and abs(number) != float("inf") else None
    return None


def to_bool(value: Any) -> bool:
    value = _scalar(value)
    if isinstance(value, str):
        return value.strip().lower() in _TRUE
    return bool(value) if value is not None else False


def to_text(value: Any) -> str | None:
    value = _scalar(value)
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    text = str(value)
    return text if text else None


def to_datetime(value: Any) -> dt.datetime | None:
    """ISO 8601 with offset, "YYYY-MM-DD HH:MM:SS UTC", epoch seconds/ms, datetime objects -> aware UTC."""
    value = _scalar(value)
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):
        stamp = value
    elif isinstance(value, dt.date):
        stamp = dt.datetime(value.year, value.month, value.day)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = value / 1000 if abs(value) > 1e11 else value  # epoch ms vs s
        try:
            return dt.datetime.fromtimestamp(seconds, dt.timezone.utc)
        except (OverflowError, OSError, ValueError):
            return None
    elif isinstance(value, str):
        text = value.strip()
        if text.endswith(" UTC"):
            text = text[:-4] + "+00:00"
        if text.endswith("Z"):
            text = text[:-1] + "+00:00"
        text = re.sub(r"([+-]\d\d)(\d\d)$", r"\1:\2", text)  # +0000 -> +00:00
        try:
            stamp = dt.datetime.fromisoformat(text)
        except ValueError:
            return None
    else:
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.timezone.utc)
    return stamp.astimezone(dt.timezone.utc)


def split_tags(value: Any) -> tuple[str, ...]:
    """A space-separated tag string or a list of tags -> tuple, order kept, duplicates dropped."""
    value = _scalar(value)
    if value is None:
        return ()
    if isinstance(value, str):
        items = value.split()
    else:
        try:
            items = [to_text(v) for v in value]
        except TypeError:
            return ()
    return tuple(dict.fromkeys(t.strip() for t in items if t and t.strip()))


def _tags_by_category(raw: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    out = {cat: split_tags(raw.get(f"tag_string_{cat}")) for cat in CATEGORIES}
    if any(raw.get(f"tag_string_{cat}") is not None for cat in CATEGORIES):
        return out
    tag_list = raw.get("tags")
    if tag_list is not None and not isinstance(tag_list, str):
        # Danbooru20xx dumps: [{"id": "..", "name": "..", "category": "0"}, ...]
        buckets: dict[str, list[str]] = {cat: [] for cat in CATEGORIES}
        try:
            for item in tag_list:
                if isinstance(item, Mapping):
                    name = to_text(item.get("name"))
                    cat = CATEGORY_IDS.get(to_int(item.get("category")) if item.get("category") is not None else 0)
                    if name and cat:
                        buckets[cat].append(name)
                elif to_text(item):
                    buckets["general"].append(to_text(item))
        except TypeError:
            pass
        return {cat: tuple(dict.fromkeys(names)) for cat, names in buckets.items()}
    # Only a flat tag_string (or a string `tags`): categories unknown, keep everything as general.
    out["general"] = split_tags(raw.get("tag_string") or raw.get("tags"))
    return out


def is_legacy_record(raw: Mapping[str, Any]) -> bool:
    return raw.get("media_asset") is None and any(key in raw for key in LEGACY_FIELDS)


def normalise_rating(value: Any, legacy: bool) -> str | None:
    text = to_text(value)
    if text is None:
        return None
    text = text.strip().lower()
    letter = RATING_WORDS.get(text, text[:1] if text else "")
    if letter not in ("g", "s", "q", "e"):
        return None
    if legacy and letter == "s" and text != "sensitive":
        return "g"  # pre-2022 "s" = safe, which is today's general
    return letter


def _md5(value: Any) -> str | None:
    text = to_text(value)
    if text is None:
        return None
    text = text.strip().lower()
    return text if _MD5.match(text) else None


def _ext(value: Any) -> str | None:
    text = to_text(value)
    if text is None:
        return None
    return text.strip().lower().lstrip(".") or None


def parse_post(raw: Mapping[str, Any], legacy_ratings: str = "auto") -> Post:
    """One post record -> Post. Raises ParseError only when there is no usable id."""
    if not isinstance(raw, Mapping):
        raise ParseError(f"post record is a {type(raw).__name__}, not an object")
    post_id = to_int(raw.get("id"))
    if post_id is None or post_id <= 0:
        raise ParseError(f"post record has no usable id (found {raw.get('id')!r})")
    media = raw.get("media_asset") if isinstance(raw.get("media_asset"), Mapping) else {}
    legacy = legacy_ratings == "legacy" or (legacy_ratings == "auto" and is_legacy_record(raw))
    tags = _tags_by_category(raw)

    def first(*keys: str, src: Mapping[str, Any] = raw) -> Any:
        for key in keys:
            value = src.get(key)
            if value is not None and value != "":
                return value
        return None

    width = to_int(first("image_width", "width")) or to_int(media.get("image_width"))
    height = to_int(first("image_height", "height")) or to_int(media.get("image_height"))
    return Post(
        id=post_id,
        md5=_md5(raw.get("md5")) or _md5(media.get("md5")),
        created_at=to_datetime(first("created_at")),
        score=to_int(raw.get("score")),
        up_score=to_int(raw.get("up_score")),
        down_score=to_int(raw.get("down_score")),
        fav_count=to_int(raw.get("fav_count")),
        rating=normalise_rating(raw.get("rating"), legacy),
        width=width,
        height=height,
        file_ext=_ext(first("file_ext")) or _ext(media.get("file_ext")),
        file_size=to_int(first("file_size")) or to_int(media.get("file_size")),
        source=to_text(raw.get("source")),
        parent_id=to_int(raw.get("parent_id")) or None,
        tags_general=tags["general"],
        tags_character=tags["character"],
        tags_copyright=tags["copyright"],
        tags_artist=tags["artist"],
        tags_meta=tags["meta"],
        file_url=to_text(raw.get("file_url")),
        is_deleted=to_bool(raw.get("is_deleted")),
        is_banned=to_bool(raw.get("is_banned")),
        is_pending=to_bool(raw.get("is_pending")),
        is_flagged=to_bool(raw.get("is_flagged")),
    )
