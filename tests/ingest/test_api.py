"""The async Danbooru client over real HTTP on loopback (the mini-booru server), plus its pacing logic."""
from __future__ import annotations

import asyncio
import random
import time
from email.utils import format_datetime
from datetime import datetime, timedelta, timezone

import pytest

from data_contracts.errors import ConfigError, StageError
from pipeline_config.ingest import ApiConfig
from tasks.ingest.api import (DanbooruClient, FetchFailed, Throttle, backoff_delay, page_error, parse_retry_after,
                              resolve_credentials)


def _cfg(**kw) -> ApiConfig:
    base = dict(base_url="http://127.0.0.1:1", requests_per_s=1000, concurrency=4, timeout_s=5, max_retries=3,
                backoff_s=0.01, backoff_max_s=0.05, slowdown_s=0.2)
    return ApiConfig(**{**base, **kw})


async def _pages(server, tags="", limit=7, **kw):
    out = []
    async with DanbooruClient(_cfg(**kw), server.url) as client:
        page = None
        while True:
            posts = await client.posts_page(tags, page, limit)
            out.append(posts)
            if len(posts) < limit:
                return out, client
            page = f"b{min(p['id'] for p in posts)}"


def test_cursor_paging_visits_every_post_once(minibooru, minibooru_server):
    pages, _ = asyncio.run(_pages(minibooru_server))
    ids = [p["id"] for page in pages for p in page]
    assert len(ids) == len(set(ids)) == minibooru.n_posts
    assert ids == sorted(ids, reverse=True)  # newest first across pages
    sent = [q["page"] for q in minibooru_server.stats.api_queries]
    assert sent[0] == "" and all(s.startswith("b") for s in sent[1:])
    assert all(q["limit"] == "7" for q in minibooru_server.stats.api_queries)


def test_429_burst_pauses_everyone_for_retry_after_then_succeeds(minibooru_server):
    minibooru_server.faults.rate_limit_burst = 2
    minibooru_server.faults.retry_after_s = 1
    started = time.monotonic()

    async def go():
        async with DanbooruClient(_cfg(), minibooru_server.url) as client:
            posts = await client.posts_page("", None, 5)
            return posts, client

    posts, client = asyncio.run(go())
    assert len(posts) == 5
    assert client.stats["http_429"] == 2 and client.stats["retries"] == 2
    assert time.monotonic() - started >= 2.0  # Retry-After: 1 honoured twice
    assert client.page_throttle.penalties == 2 and client.file_throttle.penalties == 2  # the whole crawler


def test_5xx_is_retried_and_gives_up_after_max_retries(minibooru_server):
    minibooru_server.faults.server_error_first_k = 2
    pages, client = asyncio.run(_pages(minibooru_server, limit=200))
    assert len(pages[0]) > 0 and client.stats["retries"] == 2
    assert minibooru_server.stats.count("posts", 503) == 1 and minibooru_server.stats.count("posts", 500) == 1

    minibooru_server.faults = type(minibooru_server.faults)(server_error_first_k=10)
    with pytest.raises(FetchFailed) as err:
        asyncio.run(_pages(minibooru_server, max_retries=2))
    assert err.value.reason in ("http_503", "http_500") and err.value.status in (503, 500)


def test_timeout_is_retried_then_reported(minibooru_server):
    minibooru_server.faults.api_delay_s = 1.0
    with pytest.raises(FetchFailed) as err:
        asyncio.run(_pages(minibooru_server, timeout_s=0.2, max_retries=1))
    assert err.value.reason == "timeout"
    assert minibooru_server.stats.count("posts") == 0  # both attempts were cut before the answer


def test_tag_limit_422_and_wrong_key_401_become_stage_errors_without_the_key(minibooru_server_factory):
    server = minibooru_server_factory(credentials={"alice": "s3cret-key-123456"})

    async def go(login, key, tags):
        async with DanbooruClient(_cfg(), server.url, login, key) as client:
            return await client.posts_page(tags, None, 5)

    assert len(asyncio.run(go("alice", "s3cret-key-123456", ""))) == 5
    assert server.stats.api_queries[-1]["user"] == "alice"  # Basic auth reached the server
    with pytest.raises(FetchFailed) as err:
        asyncio.run(go("alice", "s3cret-key-123456", "a b c"))
    assert err.value.status == 422
    assert "tag_limit" in str(page_error(err.value, "q"))
    with pytest.raises(FetchFailed) as err:
        asyncio.run(go("alice", "wrong-key-987654", ""))
    message = str(page_error(err.value, "q"))
    assert err.value.status == 401 and isinstance(page_error(err.value, "q"), StageError)
    assert "wrong-key-987654" not in message and "api_key_env" in message


def test_half_given_credentials_are_a_config_error(monkeypatch):
    monkeypatch.setenv("BF_TEST_LOGIN", "alice")
    monkeypatch.delenv("BF_TEST_KEY", raising=False)
    cfg = _cfg(login_env="BF_TEST_LOGIN", api_key_env="BF_TEST_KEY")
    with pytest.raises(ConfigError, match="BF_TEST_KEY"):
        resolve_credentials(cfg)
    monkeypatch.setenv("BF_TEST_KEY", "k-123456")
    assert resolve_credentials(cfg) == ("alice", "k-123456")
    monkeypatch.delenv("BF_TEST_LOGIN")
    monkeypatch.delenv("BF_TEST_KEY")
    assert resolve_credentials(cfg) == (None, None)


def test_credentials_never_go_to_another_host():
    client = DanbooruClient(_cfg(base_url="https://danbooru.donmai.us"), "https://danbooru.donmai.us", "a", "key-1234")
    assert client._auth_for("https://danbooru.donmai.us/posts.json") is not None
    assert client._auth_for("https://cdn.donmai.us/original/ab/cd/x.jpg") is None
    assert client._auth_for("http://danbooru.donmai.us/posts.json") is None  # never over plain http


# --- pacing without a network ------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


def test_throttle_spaces_requests_and_halves_the_rate_after_a_429():
    clock = FakeClock()
    throttle = Throttle(rate=4.0, slowdown_s=10.0, clock=clock, sleep=clock.sleep)

    async def take(n):
        stamps = []
        for _ in range(n):
            await throttle.acquire()
            stamps.append(clock.now)
        return stamps

    stamps = asyncio.run(take(5))
    assert stamps == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    throttle.penalize(3.0)  # Retry-After: 3
    stamps = asyncio.run(take(3))
    assert stamps[0] >= 1.0 + 3.0 - 1e-9  # nobody goes before the pause ends
    assert stamps[2] - stamps[1] == pytest.approx(0.5)  # then half rate
    clock.now += 20  # after slowdown_s the full rate is back
    stamps = asyncio.run(take(2))
    assert stamps[1] - stamps[0] == pytest.approx(0.25)


def test_unlimited_throttle_gets_a_rate_after_a_429():
    clock = FakeClock()
    throttle = Throttle(rate=None, slowdown_s=5.0, clock=clock, sleep=clock.sleep)

    async def burst():
        for _ in range(40):
            await throttle.acquire()
            clock.now += 0.05  # 20 requests/s observed
        throttle.penalize(1.0)
        stamps = []
        for _ in range(3):
            await throttle.acquire()
            stamps.append(clock.now)
        return stamps

    stamps = asyncio.run(burst())
    assert stamps[0] >= 3.0 - 1e-9  # 40 x 0.05 s + 1 s pause
    assert stamps[1] - stamps[0] == pytest.approx(1 / 10, rel=0.2)  # half of the ~20/s seen before


def test_retry_after_and_backoff():
    assert parse_retry_after("3") == 3.0 and parse_retry_after(None) is None and parse_retry_after("soon") is None
    when = datetime.now(timezone.utc) + timedelta(seconds=30)
    assert 25 <= parse_retry_after(format_datetime(when, usegmt=True)) <= 31
    rng = random.Random(0)
    delays = [backoff_delay(a, 1.0, 60.0, rng) for a in range(10)]
    assert all(0.5 * min(60, 2 ** a) <= d <= 1.5 * min(60, 2 ** a) for a, d in enumerate(delays))
    assert len({round(d, 6) for d in delays}) == len(delays)  # jitter
