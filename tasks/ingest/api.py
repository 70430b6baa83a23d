"""Async Danbooru client: auth, cursor paging, rate limits, retries with back-off and a global 429 slow-down.

- Credentials go as HTTP Basic auth, and only to the API's own origin (never to a CDN host), so the key
  is never part of a URL, a log line or an exception message.
- Every request passes a Throttle: a request-rate limit, plus a pause for the whole crawler after a 429
  (Retry-After, else `slowdown_s`) followed by `slowdown_s` at half the rate seen before the 429.
- 429, 5xx, timeouts, dropped connections and short bodies are retried with exponential back-off and
  ±50 % jitter (Retry-After wins when the server sends it). Other 4xx are final.
"""
from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import logging
import random
import time
from collections import deque
from typing import Any, Awaitable, Callable, TypeVar
from urllib.parse import urljoin, urlsplit

import aiohttp

from data_contracts.errors import ConfigError, StageError
from pipeline_config.ingest import ApiConfig
from pipeline_config.secrets import redact, register_secret, resolve_secret

log = logging.getLogger("booruflow.ingest.api")
T = TypeVar("T")
MIN_RATE = 0.2  # requests/s floor while slowed down


class FetchFailed(Exception):
    """A request that failed for good; `reason` is a rejects reason code (http_503, timeout, ...)."""

    def __init__(self, reason: str, detail: str, status: int | None = None) -> None:
        super().__init__(redact(f"{reason}: {detail}"))
        self.reason = reason
        self.detail = redact(detail)
        self.status = status


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential back-off with ±50 % jitter: base·2^attempt, capped, times U(0.5, 1.5)."""
    return min(cap, base * (2 ** attempt)) * rng.uniform(0.5, 1.5)


class Throttle:
    """Request pacing shared by every coroutine of a crawl (asyncio, one event loop)."""

    def __init__(self, rate: float | None, slowdown_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
        self.rate = rate
        self.slowdown_s = slowdown_s
        self.clock = clock
        self.sleep = sleep
        self.pause_until = 0.0
        self.slow_until = 0.0
        self.slow_rate: float | None = None
        self.last_grant = float("-inf")
        self.recent: deque[float] = deque()  # start times of the last 10 s (to know "the rate before")
        self.penalties = 0
        self.paused_s = 0.0

    def current_rate(self, now: float) -> float | None:
        if now < self.slow_until and self.slow_rate is not None:
            return self.slow_rate if self.rate is None else min(self.rate, self.slow_rate)
        return self.rate

    def observed_rate(self, now: float) -> float:
        while self.recent and self.recent[0] < now - 10.0:
            self.recent.popleft()
        if not self.recent:
            return 0.0
        return len(self.recent) / max(1.0, now - self.recent[0])

    async def acquire(self) -> None:
        while True:
            now = self.clock()
            if now < self.pause_until:
                self.paused_s += self.pause_until - now
                await self.sleep(self.pause_until - now)
                continue
            rate = self.current_rate(now)
            if rate is None:
                break
            due = self.last_grant + 1.0 / rate
            if now >= due:
                break
            # wake up and look again: a 429 pause or the end of a slow-down may have changed the answer
            wait = due - now
            if now < self.slow_until:
                wait = min(wait, self.slow_until - now + 1e-3)
            await self.sleep(wait)
        now = self.clock()
        self.last_grant = now
        self.recent.append(now)
        while self.recent and self.recent[0] < now - 10.0:
            self.recent.popleft()

    def penalize(self, pause_s: float) -> None:
        """A 429: stop everyone for pause_s, then run at half the rate we had for `slowdown_s`."""
        now = self.clock()
        before = self.current_rate(now) or max(self.observed_rate(now), MIN_RATE * 2)
        self.slow_rate = max(MIN_RATE, before / 2)
        self.pause_until = max(self.pause_until, now + pause_s)
        self.slow_until = self.pause_until + self.slowdown_s
        self.penalties += 1


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc.lower()


def _short(text: str, n: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + "…"


def resolve_credentials(cfg: ApiConfig) -> tuple[str | None, str | None]:
    """(login, api_key) from the environment; both or neither, else a ConfigError naming the variable."""
    login = resolve_secret(cfg.login_env)
    api_key = resolve_secret(cfg.api_key_env)
    if bool(login) != bool(api_key):
        missing = cfg.api_key_env if login else cfg.login_env
        raise ConfigError(
            f"ingest.api: only one Danbooru credential is set; set the environment variable {missing} too "
            f"(or unset both to crawl anonymously)"
        )
    return login, api_key


class DanbooruClient:
    """One crawl's HTTP client. Use as `async with DanbooruClient(cfg, base_url) as client:`."""

    def __init__(self, cfg: ApiConfig, base_url: str, login: str | None = None, api_key: str | None = None,
                 *, rng: random.Random | None = None) -> None:
        self.cfg = cfg
        self.base_url = base_url.rstrip("/")
        self._auth: dict[str, str] | None = None
        if login and api_key:
            token = base64.b64encode(f"{login}:{api_key}".encode()).decode()
            register_secret(token)  # the header value is as secret as the key
            self._auth = {"Authorization": f"Basic {token}"}
        self._origin = _origin(self.base_url)
        self.rng = rng or random.Random()
        self.page_throttle = Throttle(cfg.requests_per_s, cfg.slowdown_s)
        self.file_throttle = Throttle(cfg.downloads_per_s, cfg.slowdown_s)
        self.session: aiohttp.ClientSession | None = None
        self.stats = {"requests": 0, "retries": 0, "http_429": 0, "retry_wait_s": 0.0}

    async def __aenter__(self) -> "DanbooruClient":
        connector = aiohttp.TCPConnector(limit=self.cfg.concurrency + 4, limit_per_host=self.cfg.concurrency + 4,
                                         ttl_dns_cache=300)
        self.session = aiohttp.ClientSession(
            connector=connector,
            headers={"User-Agent": self.cfg.user_agent},
            # a stall of timeout_s (connect or between reads) fails a request; a slow but moving
            # transfer of a big original may take up to 10x as long in total
            timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s * 10, connect=self.cfg.timeout_s,
                                          sock_read=self.cfg.timeout_s),
            auto_decompress=True,
            raise_for_status=False,
        )
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    # --- plumbing --------------------------------------------------------------------------------------
    def absolute(self, url: str) -> str:
        return urljoin(self.base_url + "/", url)

    def _auth_for(self, url: str) -> dict[str, str] | None:
        return self._auth if _origin(url) == self._origin else None

    def _penalize_all(self, pause_s: float) -> None:
        self.page_throttle.penalize(pause_s)
        self.file_throttle.penalize(pause_s)

    async def request(self, url: str, consume: Callable[[aiohttp.ClientResponse], Awaitable[T]], *,
                      params: dict[str, Any] | None = None, throttle: Throttle | None = None,
                      retry_on: Callable[[BaseException], bool] | None = None) -> T:
        """GET with retries; `consume(response)` runs for a 2xx response (it may raise to ask a retry)."""
        assert self.session is not None, "use `async with DanbooruClient(...)`"
        throttle = throttle or self.file_throttle
        url = self.absolute(url)
        where = redact(url.split("?")[0])
        last: FetchFailed | None = None
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                self.stats["retries"] += 1
            await throttle.acquire()
            self.stats["requests"] += 1
            wait: float | None = None
            try:
                auth = self._auth_for(url)
                # with credentials attached, never follow a redirect (it could lead to another host)
                async with self.session.get(url, params=params, headers=auth, allow_redirects=auth is None) as resp:
                    status = resp.status
                    if status == 429 or status >= 500:
                        body = _short(await _safe_text(resp))
                        retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                        last = FetchFailed(f"http_{status}", f"GET {where} -> {status} {body}", status)
                        if status == 429:
                            self.stats["http_429"] += 1
                            pause = retry_after if retry_after is not None else self.cfg.slowdown_s
                            self._penalize_all(pause)
                            wait = 0.0  # the throttle holds everyone until the pause ends
                        else:
                            wait = retry_after
                    elif status >= 400:
                        body = _short(await _safe_text(resp))
                        raise FetchFailed(f"http_{status}", f"GET {where} -> {status} {body}", status)
                    else:
                        return await consume(resp)
            except FetchFailed as exc:
                if retry_on is None or not retry_on(exc):
                    raise
                last = exc
            except asyncio.TimeoutError:
                last = FetchFailed("timeout", f"GET {where}: no answer for {self.cfg.timeout_s:g} s")
            except aiohttp.ClientPayloadError as exc:
                last = FetchFailed("truncated", f"GET {where}: body ended early ({_short(str(exc), 120)})")
            except (aiohttp.ClientConnectionError, aiohttp.ClientResponseError, ConnectionError) as exc:
                last = FetchFailed("connection_error", f"GET {where}: {type(exc).__name__} {_short(str(exc), 120)}")
            except Exception as exc:  # noqa: BLE001 - a consumer may ask for a retry
                if retry_on is None or not retry_on(exc):
                    raise
                last = exc if isinstance(exc, FetchFailed) else FetchFailed("error", str(exc))
            if attempt == self.cfg.max_retries:
                break
            delay = wait if wait is not None else backoff_delay(attempt, self.cfg.backoff_s, self.cfg.backoff_max_s,
                                                                 self.rng)
            if delay:
                self.stats["retry_wait_s"] += delay
                await asyncio.sleep(delay)
            log.debug("retry %d of %s after %s", attempt + 1, where, last.reason if last else "?")
        assert last is not None
        raise last

    # --- the API ---------------------------------------------------------------------------------------
    async def posts_page(self, tags: str, page: str | int | None, limit: int) -> list[dict]:
        """One /posts.json page. Fatal answers (401/403/404/422/410) raise FetchFailed with the status."""
        params: dict[str, Any] = {"tags": tags, "limit": limit}
        if page is not None:
            params["page"] = page

        async def consume(resp: aiohttp.ClientResponse) -> list[dict]:
            raw = await resp.read()
            try:
                data = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise _BadPage(f"/posts.json answered non-JSON ({_short(raw[:200].decode('utf-8', 'replace'))})") from exc
            if isinstance(data, dict) and "posts" in data:  # some mirrors wrap the list
                data = data["posts"]
            if not isinstance(data, list):
                raise _BadPage(f"/posts.json answered {type(data).__name__}, expected a list: {_short(str(data))}")
            return data

        return await self.request("/posts.json", consume, params=params, throttle=self.page_throttle,
                                  retry_on=lambda e: isinstance(e, _BadPage))


class _BadPage(FetchFailed):
    def __init__(self, detail: str) -> None:
        super().__init__("bad_page", detail)


async def _safe_text(resp: aiohttp.ClientResponse) -> str:
    try:
        return (await resp.content.read(2048)).decode("utf-8", "replace")
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return ""


def page_error(exc: FetchFailed, query: str) -> StageError:
    """A fatal /posts.json answer as a message that says what to change."""
    hints = {
        401: "the login/api_key pair was refused; check the environment variables named by ingest.api."
             "login_env / api_key_env",
        403: "the account may not run this search (forbidden); check its level",
        404: "the server has no /posts.json here; check ingest.api.base_url",
        422: "too many tags for the account level; lower the query's tags or raise ingest.api.tag_limit only "
             "with a Gold account",
    }
    hint = hints.get(exc.status or 0, "the crawl stopped; rerun to resume from the last page")
    return StageError(redact(f"ingest query {query!r}: {exc.detail} — {hint}"))
