"""Global post filters: the first failed check gives the reject reason code and a readable detail."""
from __future__ import annotations

import datetime as dt

from pipeline_config.ingest import FilterConfig
from tasks.ingest.parse import Post
from tasks.ingest.reasons import Reject


class PostFilter:
    """Compiled filters (sets and dates resolved once; this runs on every post of a crawl)."""

    def __init__(self, cfg: FilterConfig, need_file_url: bool) -> None:
        self.cfg = cfg
        self.need_file_url = need_file_url
        self.ratings = set(cfg.ratings)
        self.exts = {"jpeg" if e == "jpg" else e for e in cfg.file_exts} | set(cfg.file_exts)
        self.exclude = set(cfg.exclude_tags)
        self.start = dt.datetime.combine(cfg.date_from, dt.time(), dt.timezone.utc) if cfg.date_from else None
        self.end = (
            dt.datetime.combine(cfg.date_to + dt.timedelta(days=1), dt.time(), dt.timezone.utc)
            if cfg.date_to
            else None
        )

    def check(self, post: Post) -> Reject | None:
        cfg = self.cfg
        if cfg.exclude_deleted and post.is_deleted:
            return Reject("deleted", "is_deleted is true")
        if cfg.exclude_banned and post.is_banned:
            return Reject("banned", "is_banned is true")
        if post.md5 is None or (self.need_file_url and not post.file_url):
            missing = [name for name, v in (("md5", post.md5), ("file_url", post.file_url)) if not v]
            if not self.need_file_url:
                missing = [m for m in missing if m != "file_url"]
            return Reject("restricted", f"no {' and no '.join(missing)} in the record")
        if post.file_ext not in self.exts:
            return Reject("unsupported_ext", f"file_ext {post.file_ext!r} not in {sorted(cfg.file_exts)}")
        if (post.width or 0) < cfg.min_width or (post.height or 0) < cfg.min_height:
            return Reject("too_small", f"{post.width}x{post.height} below {cfg.min_width}x{cfg.min_height}")
        if post.rating not in self.ratings:
            return Reject("rating", f"rating {post.rating!r} not in {sorted(self.ratings)}")
        if cfg.min_score is not None and (post.score is None or post.score < cfg.min_score):
            return Reject("low_score", f"score {post.score} below {cfg.min_score}")
        if self.exclude:
            hit = next((t for t in post.all_tags() if t in self.exclude), None)
            if hit:
                return Reject("excluded_tag", f"tag {hit!r}")
        if self.start or self.end:
            when = post.created_at
            if when is None or (self.start and when < self.start) or (self.end and when >= self.end):
                return Reject("out_of_range", f"created_at {when.isoformat() if when else None} outside "
                                              f"{cfg.date_from}..{cfg.date_to}")
        return None
