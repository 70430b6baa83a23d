"""Danbooru's tag-search language: `tag -tag ~tag metatag:value`, as /posts.json reads it.

One parser for everything that must agree on what a query means: the local Danbooru-compatible server
(packages/minibooru) answers searches with it, and the dump reader applies the same queries to offline dumps.
Metatags that Danbooru does not count against the tag limit (rating:, score:, date:, ...) are in FREE_METATAGS.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

FREE_METATAGS = {"rating", "score", "status", "width", "height", "md5", "date", "id", "filetype", "favcount", "limit",
                 "is", "mpixels", "ratio"}
COUNTED_METATAGS = {"order"}
FILE_TYPES = {"jpg", "jpeg", "png", "webp", "avif", "gif", "mp4", "webm", "zip", "swf"}


@dataclass
class Query:
    """A parsed tag search: plain tags, `-excluded`, `~any-of`, metatag predicates over API post records."""

    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    any_of: list[str] = field(default_factory=list)
    preds: list[Callable[[dict], bool]] = field(default_factory=list)
    order: str = "id_desc"
    limit: int | None = None
    counted: int = 0
    text: str = ""


_RATING_WORDS = {"g": "g", "general": "g", "s": "s", "sensitive": "s", "safe": "s", "q": "q", "questionable": "q",
                 "e": "e", "explicit": "e"}


def _range_pred(value: str, conv: Callable[[str], Any]) -> Callable[[Any], bool]:
    v = value.strip()
    try:
        if ".." in v:
            a, b = v.split("..", 1)
            lo = conv(a) if a else None
            hi = conv(b) if b else None
            return lambda x: x is not None and (lo is None or x >= lo) and (hi is None or x <= hi)
        for op, fn in ((">=", lambda x, y: x >= y), ("<=", lambda x, y: x <= y), (">", lambda x, y: x > y),
                       ("<", lambda x, y: x < y)):
            if v.startswith(op):
                y = conv(v[len(op):])
                return lambda x, y=y, fn=fn: x is not None and fn(x, y)
        if "," in v:
            allowed = {conv(s) for s in v.split(",") if s}
            return lambda x: x in allowed
        y = conv(v)
        return lambda x: x == y
    except (ValueError, TypeError):
        return lambda x: False  # an unparsable value matches nothing, like Danbooru's "none" relation


def _date(s: str) -> str:
    s = s.strip()
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", s):
        raise ValueError(s)
    return s


def parse_tags(text: str) -> Query:
    q = Query()
    for token in text.split():
        token = token.lower()
        neg = token.startswith("-") and len(token) > 1
        body = token[1:] if neg else token
        m = re.fullmatch(r"([a-z_]+):(.+)", body)
        name = m.group(1) if m else ""
        if m and name in FREE_METATAGS | COUNTED_METATAGS:
            value = m.group(2)
            if name in COUNTED_METATAGS:
                q.counted += 1
            pred = _metatag(name, value, q)
            if pred is not None:
                q.preds.append((lambda p, f=pred: not f(p)) if neg else pred)
            continue
        q.counted += 1
        if body.startswith("~") and len(body) > 1:
            q.any_of.append(body[1:])
        elif neg:
            q.exclude.append(body)
        else:
            q.include.append(body)
    return q


def _metatag(name: str, value: str, q: Query) -> Callable[[dict], bool] | None:
    if name == "rating":
        allowed = {_RATING_WORDS.get(v, "?") for v in value.split(",")}
        return lambda p: p["rating"] in allowed
    if name in ("score", "favcount", "id", "width", "height"):
        key = {"score": "score", "favcount": "fav_count", "id": "id", "width": "image_width",
               "height": "image_height"}[name]
        f = _range_pred(value, int)
        return lambda p: f(p.get(key))
    if name == "date":
        f = _range_pred(value, _date)
        return lambda p: f(p["created_at"][:10])
    if name == "md5":
        allowed = set(value.split(","))
        return lambda p: p.get("md5") in allowed
    if name in ("filetype", "is") and value in FILE_TYPES:
        allowed = set(value.split(","))
        return lambda p: p["file_ext"] in allowed
    if name == "is":
        return {"deleted": lambda p: p["is_deleted"], "banned": lambda p: p["is_banned"],
                "parent": lambda p: p["has_children"], "child": lambda p: p["parent_id"] is not None,
                "active": lambda p: not (p["is_deleted"] or p["is_banned"] or p["is_pending"] or p["is_flagged"]),
                }.get(value, lambda p: False)
    if name == "filetype":
        allowed = set(value.split(","))
        return lambda p: p["file_ext"] in allowed
    if name == "status":
        return {"deleted": lambda p: p["is_deleted"], "banned": lambda p: p["is_banned"],
                "active": lambda p: not (p["is_deleted"] or p["is_banned"] or p["is_pending"] or p["is_flagged"]),
                "pending": lambda p: p["is_pending"], "flagged": lambda p: p["is_flagged"],
                "any": lambda p: True, "all": lambda p: True}.get(value, lambda p: False)
    if name == "order":
        # change: Danbooru's updated_at order (newest change first, then id), what an update re-checks with
        q.order = {"id": "id_asc", "id_asc": "id_asc", "id_desc": "id_desc", "score": "score_desc",
                   "score_desc": "score_desc", "score_asc": "score_asc", "favcount": "favcount_desc",
                   "favcount_asc": "favcount_asc", "change": "change_desc", "change_desc": "change_desc",
                   "change_asc": "change_asc"}.get(value, "id_desc")
        return None
    if name == "limit":
        try:
            q.limit = int(value)
        except ValueError:
            pass
        return None
    if name in ("mpixels", "ratio"):
        return None  # accepted, not filtered
    return lambda p: False
