"""Verified downloads over real HTTP: every server fault ends in the right reject or a successful retry."""
from __future__ import annotations

import asyncio
import hashlib
import io
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from pipeline_config.ingest import ApiConfig
from tasks.ingest.api import DanbooruClient
from tasks.ingest.download import Downloader, image_relpath
from tasks.ingest.verify import Expected, make_verifier, verify_file
from tasks.ingest.parse import Post, parse_post


def _cfg(**kw) -> ApiConfig:
    base = dict(base_url="http://127.0.0.1:1", requests_per_s=1000, concurrency=4, timeout_s=5, max_retries=2,
                backoff_s=0.01, backoff_max_s=0.05, slowdown_s=0.1, content_retries=1)
    return ApiConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def image_posts(minibooru) -> list[Post]:
    """Posts of the mini-booru whose original is a still image the server holds."""
    posts = [parse_post(r) for r in minibooru.load_posts()]
    return [p for p in posts if p.md5 and p.file_url and p.file_ext in ("jpg", "png", "webp")]


def _download(server, pool: Path, posts: list[Post], mode: str = "thread", **kw):
    async def go():
        verifier = await make_verifier(mode, 2).start()
        try:
            async with DanbooruClient(_cfg(**kw), server.url) as client:
                dl = Downloader(client, pool, verifier, max_pixels=10**8, content_retries=client.cfg.content_retries)
                outcomes = await asyncio.gather(*(dl.download(p) for p in posts))
                return outcomes, dl
        finally:
            await verifier.close()

    return asyncio.run(go())


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_download_verifies_and_pools_once(minibooru_server, image_posts, tmp_path, mode):
    posts = image_posts[:6]
    outcomes, dl = _download(minibooru_server, tmp_path, posts, mode)
    for post, outcome in zip(posts, outcomes):
        assert outcome.ok, outcome
        path = tmp_path / outcome.image_path
        assert outcome.image_path == image_relpath(post.md5, post.file_ext) == f"images/{post.md5[:2]}/{post.md5}.{post.file_ext}"
        assert hashlib.md5(path.read_bytes()).hexdigest() == post.md5
    assert not any((tmp_path / "images" / ".incoming").iterdir())  # no temp files left
    again, dl2 = _download(minibooru_server, tmp_path, posts, mode)
    assert all(o.ok for o in again) and dl2.stats["cached"] == len(posts) and dl2.stats["fetched"] == 0
    assert all(minibooru_server.stats.file_hits[p.id] == 1 for p in posts)  # the pool made the rerun free


@pytest.mark.parametrize("fault,settings,reason,hits", [
    ("truncate_ids", {"truncate_mode": "close"}, "truncated", 3),  # transfer cut: retried, then rejected
    ("truncate_ids", {"truncate_mode": "short"}, "truncated", 2),  # short body: md5 fails, decode says truncated
    ("wrong_bytes_ids", {}, "md5_mismatch", 2),  # another valid image: one content retry
    ("html_error_ids", {}, "not_an_image", 2),
    ("missing_ids", {}, "http_404", 1),  # final at once
    ("slow_ids", {"delay_s": 1.0}, "timeout", 3),
])
def test_each_file_fault_gives_its_reject(minibooru_server, image_posts, tmp_path, fault, settings, reason, hits):
    post = next(p for p in image_posts if p.file_ext == "jpg")
    getattr(minibooru_server.faults, fault).add(post.id)
    for key, value in settings.items():
        setattr(minibooru_server.faults, key, value)
    (outcome,), _ = _download(minibooru_server, tmp_path, [post], timeout_s=0.3)
    assert not outcome.ok and outcome.reason == reason, outcome
    assert outcome.detail
    assert minibooru_server.stats.file_hits[post.id] == hits
    assert not (tmp_path / image_relpath(post.md5, post.file_ext)).exists()  # nothing bad enters the pool


@pytest.mark.parametrize("faults", [
    {"server_error_first_k": 2, "server_error_scope": "image"},
    {"rate_limit_burst": 2, "rate_limit_scope": "image", "retry_after_s": 0},
])
def test_transient_errors_are_retried_to_success(minibooru_server, image_posts, tmp_path, faults):
    for key, value in faults.items():
        setattr(minibooru_server.faults, key, value)
    posts = image_posts[:3]
    outcomes, dl = _download(minibooru_server, tmp_path, posts, max_retries=3)
    assert all(o.ok for o in outcomes), outcomes
    assert dl.client.stats["retries"] >= 2


def test_size_mismatch_against_the_post(minibooru_server, image_posts, tmp_path):
    post = replace(image_posts[0], width=image_posts[0].width + 1)
    (outcome,), _ = _download(minibooru_server, tmp_path, [post])
    assert outcome.reason == "size_mismatch" and "post says" in outcome.detail


# --- verify_file on crafted files -------------------------------------------------------------------------


def _file(tmp_path: Path, data: bytes, name="f.bin") -> tuple[Path, str]:
    path = tmp_path / name
    path.write_bytes(data)
    return path, hashlib.md5(data).hexdigest()


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def _jpg(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((w, h), 40).convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _post(md5: str, w: int, h: int, ext="png") -> Post:
    return Post(1, md5, None, 0, 0, 0, 0, "g", w, h, ext, 0, None, None, (), (), (), (), (), "x", False, False,
                False, False)


def test_verify_file_reasons(tmp_path):
    path, md5 = _file(tmp_path, _png(64, 48))
    assert verify_file(path, _post(md5, 64, 48), md5, 10**6) is None
    assert verify_file(path, _post(md5, 64, 40), md5, 10**6).reason == "size_mismatch"
    bomb, md5b = _file(tmp_path, _png(4000, 3000), "bomb.png")  # 12 MP of one colour: a few KB on disk
    assert bomb.stat().st_size < 100_000
    rej = verify_file(bomb, _post(md5b, 4000, 3000), md5b, 1_000_000)
    assert rej.reason == "decompression_bomb" and "max_pixels" in rej.detail
    jpg = _jpg(200, 200)
    cut, md5c = _file(tmp_path, jpg[: len(jpg) * 2 // 3], "cut.jpg")
    assert verify_file(cut, _post(md5c, 200, 200, "jpg"), md5c, 10**6).reason == "truncated"  # md5 ok, data short
    buf = io.BytesIO()
    Image.effect_noise((64, 48), 60).convert("RGB").save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[len(data) // 2: len(data) // 2 + 64] = b"\xff" * 64  # garbage inside the zlib stream
    broken, md5x = _file(tmp_path, bytes(data), "broken.png")
    assert verify_file(broken, _post(md5x, 64, 48), md5x, 10**6).reason == "not_an_image"
    html, md5h = _file(tmp_path, b"<!DOCTYPE html><html>Just a moment...</html>", "x.html")
    rej = verify_file(html, _post(md5, 64, 48), md5h, 10**6, "text/html")
    assert rej.reason == "not_an_image" and "text/html" in rej.detail
    empty, md5e = _file(tmp_path, b"", "empty")
    assert verify_file(empty, _post(md5, 64, 48), md5e, 10**6).reason == "truncated"
    valid_other, md5v = _file(tmp_path, _png(10, 10), "v.png")
    assert verify_file(valid_other, _post(md5, 10, 10), md5v, 10**6).reason == "md5_mismatch"


def test_process_verifier_answers_like_verify_file_and_survives_a_dead_worker(tmp_path):
    import asyncio as aio

    good, md5 = _file(tmp_path, _png(32, 16), "g.png")
    html, md5h = _file(tmp_path, b"<html>no</html>", "h.html")

    async def go():
        verifier = await make_verifier("process", 1).start()
        try:
            first = await verifier.verify(good, Expected(md5, 32, 16), md5, 10**6)
            second = await verifier.verify(html, Expected(md5, 32, 16), md5h, 10**6, "text/html")
            verifier.all[0].proc.kill()  # a decoder that dies mid-file
            await verifier.all[0].proc.wait()
            crashed = await verifier.verify(good, Expected(md5, 32, 16), md5, 10**6)
            after = await verifier.verify(good, Expected(md5, 32, 16), md5, 10**6)
            return first, second, crashed, after, verifier.crashes
        finally:
            await verifier.close()

    first, second, crashed, after, crashes = aio.run(go())
    assert first is None and second == verify_file(html, Expected(md5, 32, 16), md5h, 10**6, "text/html")
    assert crashed.reason == "not_an_image" and "crashed" in crashed.detail and crashes == 1
    assert after is None  # a fresh worker took over
