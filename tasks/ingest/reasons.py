"""Reject reason codes (one import-light module: verify worker processes use it too)."""
from __future__ import annotations

from typing import NamedTuple

# Every reason code the ingest stage can write, with what it means (shown in the report).
REASONS = {
    "parse_error": "the record has no usable post id",
    "deleted": "the post is deleted (filters.exclude_deleted)",
    "banned": "the post is banned (filters.exclude_banned)",
    "restricted": "no md5 or file_url: the account may not see the file (gold-only, banned artist, ...)",
    "unsupported_ext": "file type not in filters.file_exts (zip, mp4, webm, swf, gif, ...)",
    "too_small": "below filters.min_width / min_height",
    "rating": "rating not in filters.ratings",
    "low_score": "score below filters.min_score",
    "excluded_tag": "carries a tag from filters.exclude_tags",
    "out_of_range": "created_at outside filters.date_from..date_to",
    "duplicate_md5": "another post with the same file was taken first",
    "missing_image": "the dump has no image file for the post",
    "md5_mismatch": "the downloaded bytes do not match the post's md5",
    "not_an_image": "the file is not a decodable image (HTML error page, corrupt data)",
    "truncated": "the file or the transfer ended early",
    "decompression_bomb": "width*height above verify.max_pixels",
    "size_mismatch": "decoded width/height differ from the post's",
    "http_<status>": "the server answered this HTTP status (final 4xx answers only: 429/5xx are transient)",
}

# Failures that say nothing about the post, only about the network or the server right now. They are never
# written off as rejects: the post stays pending and a rerun retries it (see tasks/ingest/crawl.py).
TRANSIENT = {
    "timeout": "no answer within api.timeout_s on every retry",
    "connection_error": "the connection failed on every retry (network down, server gone, wrong port)",
    "http_429": "rate-limited on every retry",
    "http_5xx": "the server answered 5xx on every retry",
}


def is_transient(reason: str) -> bool:
    """Whether a download failure is transient (retry later) rather than a fact about the post."""
    if reason in ("timeout", "connection_error", "http_429"):
        return True
    return len(reason) == 8 and reason.startswith("http_5") and reason[5:].isdigit()


class Reject(NamedTuple):
    reason: str
    detail: str
