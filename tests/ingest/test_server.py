"""The Danbooru-compatible mini-booru server over real HTTP on loopback."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from PIL import Image

from minibooru import Faults, MiniBooru, MiniBooruServer, generate_minibooru

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "danbooru"
CURRENT_POST = json.loads((FIXTURES / "post_show_9969513_2025_booruhs.json").read_text())
REPO = Path(__file__).resolve().parents[2]


def get(server: MiniBooruServer | str, path: str, *, params: dict | None = None, headers: dict | None = None,
        timeout: float = 10) -> tuple[int, bytes, dict]:
    base = server if isinstance(server, str) else server.url
    url = path if path.startswith("http") else base + path
    if params:
        url += ("&" if "?" in url else "?") + urllib.parse.urlencode(params)
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def posts_json(server: MiniBooruServer, **params) -> tuple[int, list | dict]:
    status, body, _ = get(server, "/posts.json", params=params)
    return status, json.loads(body)


def all_posts(booru: MiniBooru) -> list[dict]:
    return sorted(booru.load_posts(), key=lambda p: -p["id"])


def visible_with_file(booru: MiniBooru, exts=("jpg",)) -> list[dict]:
    return [p for p in all_posts(booru) if "md5" in p and p["file_ext"] in exts]


# ------------------------------------------------------------------------------------------- /posts.json

def test_default_listing_is_newest_first_with_absolute_urls(minibooru_server: MiniBooruServer,
                                                            minibooru: MiniBooru) -> None:
    status, posts = posts_json(minibooru_server)
    assert status == 200 and len(posts) == 20
    assert [p["id"] for p in posts] == [p["id"] for p in all_posts(minibooru)[:20]]
    for p in posts:
        if "md5" in p:
            assert list(p) == list(CURRENT_POST)
            assert p["file_url"].startswith(minibooru_server.url + "/data/original/")
            assert all(v["url"].startswith(minibooru_server.url + "/data/") for v in p["media_asset"]["variants"])
        else:
            assert not {"file_url", "large_file_url", "preview_file_url"} & set(p)
            assert "md5" not in p["media_asset"]


def test_limit_defaults_to_20_and_is_clamped_to_1_200(tmp_path: Path, minibooru_server_factory) -> None:
    big = generate_minibooru(tmp_path, 230, 1, max_side=64)
    server = minibooru_server_factory(booru_dir=big.root)
    count = lambda **kw: len(json.loads(get(server, "/posts.json", params=kw)[1]))  # noqa: E731
    assert count() == 20
    assert count(limit=500) == 200
    assert count(limit=500, page=2) == 30
    assert count(limit=0) == 1
    assert count(limit="x") == 20
    assert count(tags="limit:7") == 7


def test_every_paging_mode_walks_the_same_ids(minibooru_server: MiniBooruServer, minibooru: MiniBooru) -> None:
    expected = [p["id"] for p in all_posts(minibooru)]
    numbered, page = [], 1
    while True:
        _, got = posts_json(minibooru_server, limit=7, page=page)
        numbered += [p["id"] for p in got]
        if len(got) < 7:
            break
        page += 1
    assert numbered == expected

    before, cursor = [], expected[0] + 1
    while True:
        _, got = posts_json(minibooru_server, limit=9, page=f"b{cursor}")
        ids = [p["id"] for p in got]
        assert ids == sorted(ids, reverse=True)
        before += ids
        if len(got) < 9:
            break
        cursor = ids[-1]
    assert before == expected

    after, cursor = [], 0
    while True:
        _, got = posts_json(minibooru_server, limit=8, page=f"a{cursor}")
        ids = [p["id"] for p in got]
        assert ids == sorted(ids, reverse=True)  # still newest first, like Danbooru
        after = ids + after
        if len(got) < 8:
            break
        cursor = ids[0]
    assert after == expected
    # a<id> gives the ids just above, not the newest ones
    _, got = posts_json(minibooru_server, limit=3, page=f"a{expected[-1]}")
    assert [p["id"] for p in got] == expected[-4:-1]
    # a cursor between ids works
    mid = expected[10]
    _, got = posts_json(minibooru_server, limit=2, page=f"b{mid + 1}")
    assert [p["id"] for p in got] == [mid, expected[11]]


def test_tag_and_negation_and_metatags(minibooru_server: MiniBooruServer, minibooru: MiniBooru) -> None:
    posts = all_posts(minibooru)
    tags_of = {p["id"]: set(p["tag_string"].split()) for p in posts}

    def ids(q: str) -> list[int]:
        status, got = posts_json(minibooru_server, tags=q, limit=200)
        assert status == 200, (q, got)
        return [p["id"] for p in got]

    assert ids("solo") == [p["id"] for p in posts if "solo" in tags_of[p["id"]]]
    assert ids("solo -smile") == [p["id"] for p in posts if "solo" in tags_of[p["id"]] and "smile" not in tags_of[p["id"]]]
    assert ids("solo smile") == [p["id"] for p in posts if {"solo", "smile"} <= tags_of[p["id"]]]
    assert ids("rating:g") == [p["id"] for p in posts if p["rating"] == "g"]
    assert ids("rating:g,s") == [p["id"] for p in posts if p["rating"] in "gs"]
    assert ids("-rating:g") == [p["id"] for p in posts if p["rating"] != "g"]
    assert ids("score:>=10") == [p["id"] for p in posts if p["score"] >= 10]
    assert ids("score:<3") == [p["id"] for p in posts if p["score"] < 3]
    assert ids("score:2..20") == [p["id"] for p in posts if 2 <= p["score"] <= 20]
    one = posts[5]["id"]
    assert ids(f"id:{one}") == [one]
    assert ids("status:deleted") == [p["id"] for p in posts if p["is_deleted"]]
    assert ids("-status:deleted") == [p["id"] for p in posts if not p["is_deleted"]]
    assert any(p["is_deleted"] for p in posts) and len(ids("")) == len(posts)  # deleted shown by default
    assert ids("filetype:png") == [p["id"] for p in posts if p["file_ext"] == "png"]
    assert ids("date:2020-01-01..2026-12-31") == [p["id"] for p in posts if p["created_at"][:10] >= "2020-01-01"]
    by_score = ids("order:score")
    assert [tags_of[i] for i in by_score] and by_score == [p["id"] for p in sorted(posts, key=lambda p: (-p["score"], -p["id"]))]
    assert ids("order:id") == sorted(ids(""))
    assert ids("no_such_tag") == []
    char = "aoi_kanata_(starlit_stage)"
    assert ids(f"{char} rating:g score:>=0 -status:deleted") == [
        p["id"] for p in posts if char in tags_of[p["id"]] and p["rating"] == "g" and p["score"] >= 0 and not p["is_deleted"]]
    assert ids("*_(starlit_stage)") == [p["id"] for p in posts if any(t.endswith("_(starlit_stage)") for t in tags_of[p["id"]])]


def test_tag_limit_counts_plain_tags_and_order_only(minibooru_server: MiniBooruServer, minibooru_server_factory) -> None:
    assert posts_json(minibooru_server, tags="solo smile rating:g score:>=1 -status:deleted date:2010-01-01..")[0] == 200
    assert posts_json(minibooru_server, tags="solo -smile")[0] == 200
    status, body = posts_json(minibooru_server, tags="solo smile blush")
    assert status == 422 and body["success"] is False and "2 tags" in body["message"]
    assert posts_json(minibooru_server, tags="solo smile order:score")[0] == 422
    assert posts_json(minibooru_server, tags="solo -smile -blush")[0] == 422
    gold = minibooru_server_factory(credentials={"goldie": "k"}, gold_logins=["goldie"])
    status, _, _ = get(gold, "/posts.json", params={"tags": "solo smile blush", "login": "goldie", "api_key": "k"})
    assert status == 200


def test_page_cap_410(minibooru_server: MiniBooruServer, minibooru_server_factory) -> None:
    assert posts_json(minibooru_server, page=1000)[0] == 200
    status, body = posts_json(minibooru_server, page=1001)
    assert status == 410 and body["success"] is False and "1000" in body["message"]
    small = minibooru_server_factory(page_cap=3)
    assert get(small, "/posts.json", params={"page": 3})[0] == 200
    assert get(small, "/posts.json", params={"page": 4})[0] == 410
    assert get(small, "/posts.json", params={"page": "b999999"})[0] == 200  # cursors are not capped


def test_auth_half_given_wrong_and_right(minibooru_server: MiniBooruServer, minibooru_server_factory) -> None:
    # anonymous server: anonymous fine, any complete credential fine, half-given -> 401
    assert posts_json(minibooru_server)[0] == 200
    assert get(minibooru_server, "/posts.json", params={"login": "someone", "api_key": "x"})[0] == 200
    for params in ({"login": "someone"}, {"api_key": "secret"}, {"login": "someone", "api_key": ""}):
        status, body, _ = get(minibooru_server, "/posts.json", params=params)
        assert status == 401 and json.loads(body)["success"] is False, params
    half_basic = {"Authorization": "Basic " + base64.b64encode(b"someone:").decode()}
    assert get(minibooru_server, "/posts.json", headers=half_basic)[0] == 401

    locked = minibooru_server_factory(credentials={"alice": "s3cret-key"})
    assert get(locked, "/posts.json")[0] == 200  # anonymous still allowed, like Danbooru
    assert get(locked, "/posts.json", params={"login": "alice", "api_key": "wrong"})[0] == 401
    assert get(locked, "/posts.json", params={"login": "mallory", "api_key": "s3cret-key"})[0] == 401
    assert get(locked, "/posts.json", params={"login": "alice", "api_key": "s3cret-key"})[0] == 200
    basic = {"Authorization": "Basic " + base64.b64encode(b"alice:s3cret-key").decode()}
    status, body, _ = get(locked, "/profile.json", headers=basic)
    assert status == 200 and json.loads(body)["name"] == "alice"
    assert json.loads(get(locked, "/profile.json")[1])["name"] == "Anonymous"
    assert get(locked, "/profile.json", params={"login": "alice", "api_key": "nope"})[0] == 401
    # the key is never kept in stats
    assert "s3cret-key" not in repr(locked.stats)
    assert any(q["user"] == "alice" for q in locked.stats.api_queries)


def test_post_show_and_counts(minibooru_server: MiniBooruServer, minibooru: MiniBooru) -> None:
    p = visible_with_file(minibooru)[0]
    status, body, _ = get(minibooru_server, f"/posts/{p['id']}.json")
    got = json.loads(body)
    assert status == 200 and got["md5"] == p["md5"] and got["file_url"] == minibooru_server.url + p["file_url"]
    status, body, _ = get(minibooru_server, "/posts/1.json")
    assert status == 404 and json.loads(body)["success"] is False
    status, body, _ = get(minibooru_server, "/counts/posts.json", params={"tags": "solo"})
    assert json.loads(body)["counts"]["posts"] == sum("solo" in q["tag_string"].split() for q in all_posts(minibooru))
    status, body, _ = get(minibooru_server, f"/posts/{p['id']}.json", params={"only": "id,md5,file_url"})
    assert set(json.loads(body)) == {"id", "md5", "file_url"}


def test_tags_json(minibooru_server: MiniBooruServer, minibooru: MiniBooru) -> None:
    table = minibooru.load_tags()
    status, body, _ = get(minibooru_server, "/tags.json", params={"search[name_matches]": "*_hair", "limit": 1000})
    rows = json.loads(body)
    assert status == 200 and rows and all(r["name"].endswith("_hair") for r in rows)
    assert len(rows) == sum(t["name"].endswith("_hair") for t in table)
    status, body, _ = get(minibooru_server, "/tags.json",
                          params={"search[category]": 4, "search[order]": "count", "limit": 5})
    rows = json.loads(body)
    assert [r["category"] for r in rows] == [4] * len(rows) and len(rows) == 5
    assert [r["post_count"] for r in rows] == sorted((r["post_count"] for r in rows), reverse=True)
    top = max((t for t in table if t["category"] == 4), key=lambda t: t["post_count"])
    assert rows[0]["post_count"] == top["post_count"]
    p1 = json.loads(get(minibooru_server, "/tags.json", params={"limit": 10, "page": 1})[1])
    p2 = json.loads(get(minibooru_server, "/tags.json", params={"limit": 10, "page": 2})[1])
    assert len(p1) == len(p2) == 10 and not {r["id"] for r in p1} & {r["id"] for r in p2}
    assert json.loads(get(minibooru_server, "/tags.json", params={"search[name]": "solo,1girl"})[1])


# ------------------------------------------------------------------------------------------------ files

def test_original_and_variant_files(minibooru_server: MiniBooruServer, minibooru: MiniBooru) -> None:
    for p in visible_with_file(minibooru, ("jpg", "png", "webp", "gif"))[:8]:
        status, data, headers = get(minibooru_server, p["file_url"])
        assert status == 200 and hashlib.md5(data).hexdigest() == p["md5"] and len(data) == p["file_size"]
        assert headers["Content-Type"].startswith("image/")
        for v in p["media_asset"]["variants"]:
            status, data, _ = get(minibooru_server, v["url"])
            assert status == 200, v
            with Image.open(io.BytesIO(data)) as im:
                assert im.size == (v["width"], v["height"]), v
                assert im.format.lower().replace("jpeg", "jpg") == v["file_ext"]
    p = visible_with_file(minibooru)[0]
    status, data, headers = get(minibooru_server, p["file_url"], headers={"Range": "bytes=10-"})
    assert status == 206 and data == minibooru.image_path(p["md5"], "jpg").read_bytes()[10:]
    assert get(minibooru_server, "/data/original/00/00/" + "0" * 32 + ".jpg")[0] == 404
    assert minibooru_server.stats.file_hits[p["id"]] >= 2


def test_many_concurrent_downloads_with_aiohttp(minibooru_server: MiniBooruServer, minibooru: MiniBooru) -> None:
    posts = visible_with_file(minibooru, ("jpg", "png", "webp", "gif"))

    async def run() -> list[bool]:
        async with aiohttp.ClientSession() as s:
            async def one(p):
                async with s.get(minibooru_server.url + p["file_url"]) as r:
                    return r.status == 200 and hashlib.md5(await r.read()).hexdigest() == p["md5"]
            return await asyncio.gather(*(one(p) for p in posts * 3))

    assert all(asyncio.run(run()))
    assert minibooru_server.stats.count("original", 200) == 3 * len(posts)


# ----------------------------------------------------------------------------------------------- faults

def test_rate_limit_burst_then_ok(minibooru_server: MiniBooruServer, minibooru: MiniBooru) -> None:
    minibooru_server.faults.rate_limit_burst = 2
    minibooru_server.faults.retry_after_s = 3
    for _ in range(2):
        status, body, headers = get(minibooru_server, "/posts.json")
        assert status == 429 and headers["Retry-After"] == "3" and json.loads(body)["success"] is False
    assert get(minibooru_server, "/posts.json")[0] == 200
    # scoped to images: the API keeps answering
    minibooru_server.faults.rate_limit_burst = 1
    minibooru_server.faults.rate_limit_scope = "image"
    assert get(minibooru_server, "/posts.json")[0] == 200
    p = visible_with_file(minibooru)[0]
    assert get(minibooru_server, p["file_url"])[0] == 429
    assert get(minibooru_server, p["file_url"])[0] == 200
    assert minibooru_server.stats.count(status=429) == 3


def test_server_errors_first_k_per_url(minibooru_server: MiniBooruServer, minibooru: MiniBooru) -> None:
    minibooru_server.faults.server_error_first_k = 2
    assert [get(minibooru_server, "/posts.json?limit=5")[0] for _ in range(3)] == [503, 500, 200]
    assert [get(minibooru_server, "/posts.json?limit=6")[0] for _ in range(3)] == [503, 500, 200]  # per URL
    # credentials do not make a new URL
    p = visible_with_file(minibooru)[0]
    assert [get(minibooru_server, p["file_url"])[0] for _ in range(3)] == [503, 500, 200]
    minibooru_server.faults = Faults(server_error_first_k=1, server_error_scope="api", server_error_statuses=(503,))
    assert get(minibooru_server, p["file_url"])[0] == 200
    assert get(minibooru_server, "/posts.json?limit=5")[0] == 503


def test_slow_file_times_out_then_recovers(minibooru_server: MiniBooruServer, minibooru: MiniBooru) -> None:
    p = visible_with_file(minibooru)[0]
    minibooru_server.faults.slow_ids = {p["id"]}
    minibooru_server.faults.delay_s = 1.5
    with pytest.raises((TimeoutError, socket.timeout, urllib.error.URLError)):
        get(minibooru_server, p["file_url"], timeout=0.3)
    t0 = time.monotonic()
    status, data, _ = get(minibooru_server, p["file_url"], timeout=5)
    assert status == 200 and time.monotonic() - t0 >= 1.4 and hashlib.md5(data).hexdigest() == p["md5"]
    minibooru_server.faults.slow_ids = set()
    minibooru_server.faults.api_delay_s = 0.4
    t0 = time.monotonic()
    assert get(minibooru_server, "/posts.json")[0] == 200 and time.monotonic() - t0 >= 0.35


def test_truncated_bodies(minibooru_server: MiniBooruServer, minibooru: MiniBooru) -> None:
    p = visible_with_file(minibooru)[0]
    minibooru_server.faults.truncate_ids = {p["id"]}
    with pytest.raises(http.client.IncompleteRead):
        get(minibooru_server, p["file_url"])

    async def with_aiohttp() -> None:
        async with aiohttp.ClientSession() as s:
            async with s.get(minibooru_server.url + p["file_url"]) as r:
                assert r.headers["Content-Length"] == str(p["file_size"])
                await r.read()

    with pytest.raises(aiohttp.ClientPayloadError):
        asyncio.run(with_aiohttp())
    minibooru_server.faults.truncate_mode = "short"
    status, data, _ = get(minibooru_server, p["file_url"])
    assert status == 200 and len(data) == p["file_size"] // 2 and hashlib.md5(data).hexdigest() != p["md5"]
    assert get(minibooru_server, "/posts.json")[0] == 200  # the server survives


def test_wrong_bytes_html_page_and_missing(minibooru_server: MiniBooruServer, minibooru: MiniBooru) -> None:
    a, b, c = visible_with_file(minibooru)[:3]
    minibooru_server.faults.wrong_bytes_ids = {a["id"]}
    minibooru_server.faults.html_error_ids = {b["id"]}
    minibooru_server.faults.missing_ids = {c["id"]}
    status, data, _ = get(minibooru_server, a["file_url"])
    assert status == 200 and hashlib.md5(data).hexdigest() != a["md5"]
    Image.open(io.BytesIO(data)).load()  # a valid image, just not this post's
    status, data, headers = get(minibooru_server, b["file_url"])
    assert status == 200 and headers["Content-Type"].startswith("text/html") and data.startswith(b"<!DOCTYPE html>")
    assert get(minibooru_server, c["file_url"])[0] == 404
    minibooru_server.faults = Faults()
    for p in (a, b, c):
        status, data, _ = get(minibooru_server, p["file_url"])
        assert status == 200 and hashlib.md5(data).hexdigest() == p["md5"]


def test_restricted_ids_hide_file_fields(minibooru_server: MiniBooruServer, minibooru: MiniBooru) -> None:
    p = visible_with_file(minibooru)[0]
    minibooru_server.faults.restricted_ids = {p["id"]}
    got = json.loads(get(minibooru_server, f"/posts/{p['id']}.json")[1])
    assert not {"md5", "file_url", "large_file_url", "preview_file_url"} & set(got)
    assert got["id"] == p["id"] and "md5" not in got["media_asset"]
    listed = {q["id"]: q for q in posts_json(minibooru_server, limit=200)[1]}
    assert "file_url" not in listed[p["id"]]
    minibooru_server.faults.restricted_ids = set()
    assert "file_url" in json.loads(get(minibooru_server, f"/posts/{p['id']}.json")[1])


def test_admin_endpoint_switches_faults(minibooru_server_factory) -> None:
    server = minibooru_server_factory(admin=True)
    req = urllib.request.Request(server.url + "/_minibooru/faults", method="PUT",
                                 data=json.dumps({"rate_limit_burst": 1, "retry_after_s": 2}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        assert json.loads(r.read())["rate_limit_burst"] == 1
    assert get(server, "/posts.json")[0] == 429
    assert get(server, "/posts.json")[0] == 200
    stats = json.loads(get(server, "/_minibooru/stats")[1])
    assert ["posts", 429, 1] in stats["requests"]


def test_cli_serves_until_sigterm(minibooru: MiniBooru) -> None:
    cmd = [sys.executable, "-m", "minibooru", "serve", "--dir", str(minibooru.root), "--posts", "60",
           "--seed", "7", "--max-side", "320", "--port", "0"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("MINIBOORU_URL="), proc.stderr.read() if proc.poll() is not None else line
        url = line.split("=", 1)[1]
        status, body, _ = get(url, "/posts.json", params={"limit": 3})
        assert status == 200 and len(json.loads(body)) == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_client_that_leaves_during_a_delay_is_recorded_as_499(minibooru_server: MiniBooruServer) -> None:
    minibooru_server.faults.api_delay_s = 0.6
    with pytest.raises((TimeoutError, socket.timeout, urllib.error.URLError)):
        get(minibooru_server, "/posts.json", timeout=0.2)
    deadline = time.monotonic() + 5
    while minibooru_server.stats.count("posts") == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert minibooru_server.stats.count("posts", 499) == 1 and minibooru_server.stats.count("posts", 200) == 0


def test_edits_show_as_danbooru_shows_them(minibooru: MiniBooru, minibooru_server_factory, tmp_path: Path) -> None:
    """Uploads, retags, deletions, bans and expunges between two requests (in the server's memory only): every edit
    moves the post to the top of order:change; searches, single posts and files follow."""
    from minibooru.edits import fresh_posts

    server = minibooru_server_factory()  # its own server: the session one stays unedited
    visible = visible_with_file(minibooru, exts=("jpg", "png"))
    a, b, c, d = (p["id"] for p in visible[:4])
    server.retag(a, add=["new_tag_x"], remove=[minibooru.load_posts()[0]["tag_string_general"].split()[0]],
                 rating="e")
    server.delete(b)
    server.ban(c)
    server.expunge(d)
    [new] = server.upload(fresh_posts(tmp_path / "fresh", 1, seed=5, max_side=128)[:1])
    changed = [p["id"] for p in posts_json(server, tags="order:change", limit=4)[1]]
    assert set(changed) == {new, a, b, c}  # the newest changes (ties: id desc, as on Danbooru)
    post_a = server.post(a)
    assert "new_tag_x" in post_a["tag_string_general"].split() and post_a["rating"] == "e"
    assert [p["id"] for p in posts_json(server, tags="new_tag_x")[1]] == [a]
    assert [p["id"] for p in posts_json(server, tags=f"id:{b}")[1]] == [b]  # a deleted post is still returned
    assert posts_json(server, tags=f"id:{b} -status:deleted")[1] == []
    banned = posts_json(server, tags=f"id:{c}")[1][0]
    assert banned["is_banned"] and "md5" not in banned and "file_url" not in banned
    assert get(server, f"/posts/{d}.json")[0] == 404 and posts_json(server, tags=f"id:{d}")[1] == []
    uploaded = posts_json(server, tags=f"id:{new}")[1][0]
    assert new == max(p["id"] for p in all_posts(minibooru)) + 1 and uploaded["created_at"] == uploaded["updated_at"]
    status, body, _ = get(server, uploaded["file_url"])
    assert status == 200 and hashlib.md5(body).hexdigest() == uploaded["md5"]
