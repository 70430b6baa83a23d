"""Verified downloads into the content-addressed image pool.

A file enters the pool only after: the body was streamed to a temp file in the pool's own folder
(hashing on the way), its md5 equals the post's, it fully decodes (with a decompression-bomb limit)
and its decoded size equals the post's width x height. Then one atomic rename puts it at
`images/<md5[:2]>/<md5>.<ext>`, so a file in the pool is always complete and verified, and a rerun after
a kill skips it. Memory stays flat: bodies stream in 256 KiB chunks, one decode per verify worker.
When the data root is on object storage, `pool` is the local mirror of the store's pool: the store's
pool API (data_contracts.store) answers "is it there" and publishes each verified file with one upload.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from data_contracts.store import remote_pool
from tasks.ingest.api import DanbooruClient, FetchFailed
from tasks.ingest.parse import Post
from tasks.ingest.reasons import Reject, is_transient
from tasks.ingest.verify import ProcessVerifier, ThreadVerifier

CHUNK = 1 << 18
INCOMING = ".incoming"  # temp folder inside the pool (same filesystem: the final rename is atomic)
CONTENT_REASONS = ("md5_mismatch", "not_an_image", "truncated")  # worth one more download


def image_relpath(md5: str, ext: str) -> str:
    """Where a file lives, relative to the pool folder (the posts.parquet `image_path`)."""
    return f"images/{md5[:2]}/{md5}.{ext}"


@dataclass
class Outcome:
    """What happened to one post's file."""

    ok: bool
    reason: str = ""
    detail: str = ""
    image_path: str = ""  # relative to the pool
    fetched_bytes: int = 0  # 0 when the pool already had the file
    attempts: int = 0

    @property
    def transient(self) -> bool:
        """A failure of the network or server, not of the post: retried by a rerun, never a reject."""
        return not self.ok and is_transient(self.reason)


def pool_has(pool: Path, post: Post) -> str | None:
    """The pool path of the post's file when a complete copy is already there (checked by size)."""
    rel = image_relpath(post.md5 or "", post.file_ext or "")
    store = remote_pool(pool)
    if store is not None:  # object storage: the store's pool listing decides
        return rel if store.pool_has(rel, post.file_size) else None
    path = pool / rel
    try:
        size = path.stat().st_size
    except OSError:
        return None
    if post.file_size and size != post.file_size:
        return None  # a copy from before a power loss, or a changed file: fetch again
    return rel


_MADE_DIRS: set[Path] = set()


def commit_to_pool(tmp: Path, pool: Path, rel: str) -> None:
    store = remote_pool(pool)
    if store is not None:  # object storage: upload (one PUT), then the file becomes the mirror copy
        store.pool_put(tmp, rel)
        return
    final = pool / rel
    if final.parent not in _MADE_DIRS:  # 256 shard folders: one mkdir each per process
        final.parent.mkdir(parents=True, exist_ok=True)
        _MADE_DIRS.add(final.parent)
    try:
        os.replace(tmp, final)
    except FileNotFoundError:  # the folder was removed behind our back: make it again
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)


def temp_path(pool: Path, md5: str) -> Path:
    """A temp file name that says which process owns it (`<md5>.<pid>.<random>.part`)."""
    return pool / "images" / INCOMING / f"{md5}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def clean_incoming(pool: Path, older_than_s: float = 6 * 3600) -> int:
    """Remove temp files left by killed runs: their process is gone, or they are very old."""
    store = remote_pool(pool)
    if store is not None:
        store.pool_index()  # object storage: list the pool now, before any download is in flight
    folder = pool / "images" / INCOMING
    removed = 0
    if folder.exists():
        cutoff = time.time() - older_than_s
        for path in folder.iterdir():
            parts = path.name.split(".")
            try:
                dead = len(parts) == 4 and parts[1].isdigit() and not _alive(int(parts[1]))
                if dead or path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except OSError:
                pass
    return removed


class Downloader:
    """Fetch + verify + pool one post at a time; many run concurrently on one event loop."""

    def __init__(self, client: DanbooruClient, pool: Path, verifier: ThreadVerifier | ProcessVerifier, *,
                 max_pixels: int, content_retries: int) -> None:
        self.client = client
        self.pool = pool
        self.verifier = verifier
        self.max_pixels = max_pixels
        self.content_retries = content_retries
        self.incoming = pool / "images" / INCOMING
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.stats = {"fetched": 0, "cached": 0, "bytes": 0, "content_retries": 0, "verify_s": 0.0}

    async def _fetch(self, url: str, post: Post, tmp: Path) -> tuple[str, str | None, int]:
        limit = max(post.file_size or 0, 1) * 2 + (1 << 20)  # stop a runaway body early

        async def consume(resp: aiohttp.ClientResponse) -> tuple[str, str | None, int]:
            digest = hashlib.md5()
            size = 0
            with open(tmp, "wb") as fh:
                async for chunk in resp.content.iter_chunked(CHUNK):
                    size += len(chunk)
                    if size > limit:
                        break
                    digest.update(chunk)
                    fh.write(chunk)
            return digest.hexdigest(), resp.headers.get("Content-Type"), size

        return await self.client.request(url, consume, throttle=self.client.file_throttle)

    async def download(self, post: Post) -> Outcome:
        assert post.md5 and post.file_url and post.file_ext
        rel = pool_has(self.pool, post)
        if rel:
            self.stats["cached"] += 1
            return Outcome(True, image_path=rel)
        rel = image_relpath(post.md5, post.file_ext)
        tmp = temp_path(self.pool, post.md5)
        fetched = 0
        reject: Reject | None = None
        attempts = 0
        try:
            for attempt in range(self.content_retries + 1):
                attempts += 1
                try:
                    actual, ctype, size = await self._fetch(post.file_url, post, tmp)
                except FetchFailed as exc:
                    return Outcome(False, exc.reason, exc.detail, fetched_bytes=fetched, attempts=attempts)
                fetched += size
                self.stats["fetched"] += 1
                self.stats["bytes"] += size
                started = time.perf_counter()
                reject = await self.verifier.verify(tmp, post, actual, self.max_pixels, ctype)
                self.stats["verify_s"] += time.perf_counter() - started
                reject = short_body(reject, post, size, tmp)
                if reject is None:
                    if remote_pool(self.pool) is not None:  # an upload: keep the event loop free
                        await asyncio.to_thread(commit_to_pool, tmp, self.pool, rel)
                    else:
                        commit_to_pool(tmp, self.pool, rel)
                    return Outcome(True, image_path=rel, fetched_bytes=fetched, attempts=attempts)
                if reject.reason not in CONTENT_REASONS:
                    break
                if attempt < self.content_retries:
                    self.stats["content_retries"] += 1
            assert reject is not None
            return Outcome(False, reject.reason, reject.detail, fetched_bytes=fetched, attempts=attempts)
        finally:
            tmp.unlink(missing_ok=True)


_MAGIC = (b"\xff\xd8", b"\x89PNG", b"GIF8", b"RIFF")  # JPEG, PNG, GIF, WebP
# AVIF (ISO-BMFF): a 4-byte box size, `ftyp`, the major brand (avif/avis, or mif1/msf1 with avif among the
# compatible brands that follow it, up to the box's end).
_AVIF_BRANDS = (b"avif", b"avis")
_HEAD_BYTES = 64


def image_head(head: bytes) -> bool:
    """The first bytes of a file start an image of a type the pool takes (not an HTML or JSON page)."""
    if head.startswith(_MAGIC):
        return True
    if head[4:8] != b"ftyp":
        return False
    brands = head[8:int.from_bytes(head[:4], "big")]
    return any(brands[i:i + 4] in _AVIF_BRANDS for i in range(0, len(brands) - 3, 4))


def short_body(reject: Reject | None, post: Post, size: int, path: Path) -> Reject | None:
    """An image's first bytes but fewer of them than the post's file_size: the transfer was cut, whatever the
    decoder made of the stump (a cut inside the JPEG header reads as "not an image"). An HTML error page
    is no image at all and keeps its reason."""
    if reject is None or reject.reason != "not_an_image" or not post.file_size or size >= post.file_size:
        return reject
    try:
        with open(path, "rb") as fh:
            head = fh.read(_HEAD_BYTES)
    except OSError:
        return reject
    if not image_head(head):
        return reject
    return Reject("truncated", f"received {size} of {post.file_size} bytes ({reject.reason}: {reject.detail})")


def outcome_json(post_id: int, md5: str | None, outcome: Outcome) -> dict[str, Any]:
    record: dict[str, Any] = {"id": post_id, "md5": md5, "ok": outcome.ok}
    if outcome.ok:
        record["path"] = outcome.image_path
    else:
        record["reason"], record["detail"] = outcome.reason, outcome.detail
    if outcome.fetched_bytes:
        record["bytes"] = outcome.fetched_bytes
    return record
