"""A Danbooru-compatible HTTP server for a generated mini-booru, with switchable faults.

`serve_minibooru(dir)` starts a real aiohttp server on loopback in a background thread (its own event loop)
and returns a `MiniBooruServer` (a context manager): `.url`, `.faults` (mutable while it runs), `.stats`,
`.stop()`.

Endpoints (Danbooru semantics; see REFERENCE.md "Danbooru API"):
  GET /posts.json          tags, limit (default 20, clamped to 1..200), page (N | b<id> | a<id>), only=
  GET /posts/<id>.json     one post; 404 JSON when absent
  GET /counts/posts.json   {"counts": {"posts": N}} for tags
  GET /tags.json           search[name_matches] (* wildcards), search[name] (comma list), search[category],
                           search[order] = count | name | date | id (default id desc), search[hide_empty],
                           limit (default 20, max 1000), page
  GET /profile.json        the authenticated user (or Anonymous)
  GET /data/<variant>/<md5[0:2]>/<md5[2:4]>/<file>
                           files: original (the exact bytes, md5/file_size as in the post), 180x180 / 360x360
                           (jpg), 720x720 (webp), sample (sample-<md5>.jpg, 850 px wide), full (jpg of a webp);
                           variants are real resized renditions made on first request.

Tag search: AND of plain tags, `-tag` negation, `~tag` OR-group, `*` wildcards; metatags rating:g / rating:g,s
(also -rating:), score:/favcount:/id:/width:/height: with N, >=N, >N, <=N, <N, N..M, N.., ..M, comma lists;
date:YYYY-MM-DD (ranges too), md5:, filetype:/is:<ext>, status:active|deleted|banned|any (and -status:deleted),
order:id|id_asc|id_desc|score|score_asc|favcount|favcount_asc, limit:N. The tag limit (2 for anonymous and
Members, 6 for Gold) counts plain tags (negated and OR-ed ones too) and order:, not the free metatags; a search
over the limit -> 422. Deleted posts are returned unless the query says -status:deleted / status:active.
Pages: page=N newest first with an offset; N > page_cap -> 410. page=b<id>: the `limit` highest ids below id,
page=a<id>: the `limit` lowest ids above id; both answered id-descending like Danbooru (order: ignored).
Posts the viewer may not see come without md5/file_url/large_file_url/preview_file_url.

order:change (Danbooru's updated_at order, newest change first) pages by page number like every order:.

Edits (in memory, as Danbooru makes them; see edits.py): `server.upload(posts)`, `server.retag(id, add=, remove=,
rating=)`, `server.delete(id)`, `server.ban(id)`, `server.expunge(id)` change what later requests see, so a test can
crawl, edit, and crawl again.

Auth: `login`+`api_key` query params or HTTP Basic. A half-given credential -> 401; with `credentials` set a
wrong key or unknown login -> 401; without, any complete credential is accepted. Errors are Danbooru JSON
{"success": false, "error": ..., "message": ...}. Images need no auth (they live on the CDN). Secrets are never
logged or kept in stats.
"""
from __future__ import annotations

import asyncio
import base64
import copy
import fnmatch
import io
import json
import re
import threading
from bisect import bisect_left, bisect_right
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Literal

from aiohttp import web
from PIL import Image

from tasks.ingest.tag_query import Query, parse_tags

from . import edits
from .generate import MARKER, hide_file_fields
from .render import placeholder

Scope = Literal["all", "api", "image"]

CONTENT_TYPES = {
    "jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp", "avif": "image/avif",
    "gif": "image/gif",
    "mp4": "video/mp4", "webm": "video/webm", "zip": "application/zip", "swf": "application/x-shockwave-flash",
}
HTML_ERROR_PAGE = (b"<!DOCTYPE html><html lang=\"en-US\"><head><title>Just a moment...</title></head>"
                   b"<body><h1>Checking your browser before accessing danbooru.donmai.us</h1>"
                   b"<p>This process is automatic.</p></body></html>")


# ---------------------------------------------------------------------------------------------- faults


@dataclass
class Faults:
    """Switchable server faults; deterministic (no randomness). Change fields while the server runs.

    rate_limit_burst      the next N requests in `rate_limit_scope` get 429 with Retry-After: retry_after_s
    server_error_first_k  the first k requests per URL (path+query, credentials removed) in
                          `server_error_scope` get server_error_statuses[attempt % len] (503, 500, ...)
    slow_ids / delay_s    files of these post ids answer after delay_s seconds
    api_delay_s           every API response waits this long
    truncate_ids          files of these posts are cut short: "close" = Content-Length says the full size, half is
                          sent, then the connection is closed; "short" = a complete response of the first half
    wrong_bytes_ids       files of these posts answer with another post's (valid) image -> md5 mismatch
    html_error_ids        files of these posts answer 200 text/html (a Cloudflare-like page)
    missing_ids           files of these posts answer 404
    unavailable_ids       files of these posts answer 503 every time (a server that stays down for them)
    restricted_ids        these posts are served as the viewer may not see them (no md5 / file URLs)
    """

    rate_limit_burst: int = 0
    rate_limit_scope: Scope = "all"
    retry_after_s: int = 1
    server_error_first_k: int = 0
    server_error_scope: Scope = "all"
    server_error_statuses: tuple[int, ...] = (503, 500)
    slow_ids: set[int] = field(default_factory=set)
    delay_s: float = 0.5
    api_delay_s: float = 0.0
    truncate_ids: set[int] = field(default_factory=set)
    truncate_mode: Literal["close", "short"] = "close"
    wrong_bytes_ids: set[int] = field(default_factory=set)
    html_error_ids: set[int] = field(default_factory=set)
    missing_ids: set[int] = field(default_factory=set)
    unavailable_ids: set[int] = field(default_factory=set)
    restricted_ids: set[int] = field(default_factory=set)
    # per-URL attempt counters for server_error_first_k (reset by replacing the Faults object)
    _attempts: Counter = field(default_factory=Counter, repr=False, compare=False)

    def to_json(self) -> dict:
        out = {}
        for f in fields(self):
            if f.name.startswith("_"):
                continue
            v = getattr(self, f.name)
            out[f.name] = sorted(v) if isinstance(v, set) else list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_json(cls, data: dict) -> "Faults":
        kw: dict[str, Any] = {}
        names = {f.name for f in fields(cls) if not f.name.startswith("_")}
        for k, v in data.items():
            if k not in names:
                raise ValueError(f"unknown fault {k!r}; known: {sorted(names)}")
            if k.endswith("_ids"):
                v = {int(x) for x in v}
            elif k == "server_error_statuses":
                v = tuple(int(x) for x in v)
            kw[k] = v
        return cls(**kw)


@dataclass
class ServerStats:
    """What the server saw, recorded when a handler finishes. requests: (kind, status) -> count; kinds: posts,
    post, counts, tags, profile, original, variant, admin, other; status 499 = the client left during a delay. file_hits: post id -> answered requests for its original file (any status).
    api_queries: one dict per API request: path, tags, page, limit, user (login or None; never the key)."""

    requests: Counter = field(default_factory=Counter)
    file_hits: Counter = field(default_factory=Counter)
    api_queries: deque = field(default_factory=lambda: deque(maxlen=10_000))  # the latest 10k
    bytes_sent: int = 0

    def count(self, kind: str | None = None, status: int | None = None) -> int:
        return sum(n for (k, s), n in list(self.requests.items())
                   if (kind is None or k == kind) and (status is None or s == status))


# ------------------------------------------------------------------------------------------------ store


class _Store:
    """The booru in memory: posts by id, tag postings, the tag table and file locations."""

    def __init__(self, root: Path, preload_bytes: int):
        self.root = root
        with (root / "posts.jsonl").open(encoding="utf-8") as fh:
            posts = [json.loads(line) for line in fh if line.strip()]
        posts.sort(key=lambda p: p["id"])
        self.posts: dict[int, dict] = {p["id"]: p for p in posts}
        self.ids_asc: list[int] = [p["id"] for p in posts]
        self.tags_of: dict[int, frozenset[str]] = {p["id"]: frozenset(p["tag_string"].split()) for p in posts}
        self.postings: dict[str, set[int]] = {}
        for pid, tags in self.tags_of.items():
            for t in tags:
                self.postings.setdefault(t, set()).add(pid)
        self.tags: list[dict] = json.loads((root / "tags.json").read_text(encoding="utf-8"))
        self.tags.sort(key=lambda t: -t["id"])
        # md5 -> (post id, original ext, path; None: an upload's file, kept in `memory`); only files that exist
        self.files: dict[str, tuple[int, str, Path | None]] = {}
        for p in posts:
            md5 = p.get("md5")
            if md5:
                path = root / "images" / f"{md5}.{p['file_ext']}"
                if path.exists():
                    self.files[md5] = (p["id"], p["file_ext"], path)
        total = sum(path.stat().st_size for _, _, path in self.files.values())
        self.memory: dict[str, bytes] = {}
        if total <= preload_bytes:
            self.memory = {md5: path.read_bytes() for md5, (_, _, path) in self.files.items()}
        self.md5_of: dict[int, str] = {pid: md5 for md5, (pid, _, _) in self.files.items()}
        # ids with a decodable image, per extension (wrong_bytes serves another image of the same type)
        self.image_ids: dict[str, list[int]] = {}
        for md5, (pid, ext, _) in sorted(self.files.items(), key=lambda kv: kv[1][0]):
            if ext in ("jpg", "png", "webp", "avif", "gif"):
                self.image_ids.setdefault(ext, []).append(pid)

    def file_bytes(self, md5: str) -> bytes:
        data = self.memory.get(md5)
        if data is None:
            data = self.files[md5][2].read_bytes()
        return data

    # --- edits (server.upload / retag / delete / ban / expunge) -----------------------------------------
    def put(self, post: dict, data: bytes | None = None) -> None:
        """Insert or replace a post (and, for an upload, keep its file in memory)."""
        pid = post["id"]
        if pid in self.posts:
            self.drop(pid, keep_file=data is None)
        self.posts[pid] = post
        self.ids_asc.insert(bisect_left(self.ids_asc, pid), pid)
        self.tags_of[pid] = frozenset(post["tag_string"].split())
        for t in self.tags_of[pid]:
            self.postings.setdefault(t, set()).add(pid)
        md5 = post.get("md5")
        if md5 and data is not None:
            self.memory[md5] = data
            self.files[md5] = (pid, post["file_ext"], None)
        if md5 and md5 in self.files:
            self.md5_of[pid] = md5
            if post["file_ext"] in ("jpg", "png", "webp", "avif", "gif"):
                ids = self.image_ids.setdefault(post["file_ext"], [])
                if pid not in ids:
                    ids.insert(bisect_left(ids, pid), pid)

    def drop(self, pid: int, keep_file: bool = False) -> dict:
        """Remove a post from every index (and its file unless keep_file: a tag edit keeps it)."""
        post = self.posts.pop(pid)
        self.ids_asc.pop(bisect_left(self.ids_asc, pid))
        for t in self.tags_of.pop(pid, frozenset()):
            self.postings.get(t, set()).discard(pid)
        md5 = self.md5_of.pop(pid, None)
        if md5 and not keep_file:
            self.files.pop(md5, None)
            self.memory.pop(md5, None)
            for ids in self.image_ids.values():
                if pid in ids:
                    ids.remove(pid)
        elif md5:
            self.md5_of[pid] = md5
        return post

    def categories(self) -> dict[str, int]:
        return {t["name"]: t["category"] for t in self.tags}


# ---------------------------------------------------------------------------------------- tag queries


class QueryError(Exception):
    def __init__(self, status: int, error: str, message: str):
        super().__init__(message)
        self.status, self.error, self.message = status, error, message


# ---------------------------------------------------------------------------------------------- server


def _stamp(value: str | None) -> datetime:
    """An API timestamp ("2024-05-01T12:00:00.000-04:00") as an aware datetime (offsets differ: not sortable as text)."""
    try:
        return datetime.fromisoformat(value) if value else _EPOCH
    except ValueError:
        return _EPOCH


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _client_gone(request: web.Request) -> bool:
    """True when the client closed the connection (e.g. its timeout fired during a fault delay); such a request
    is recorded in stats with nginx's status 499 "client closed request"."""
    return request.transport is None or request.transport.is_closing()


def _error(status: int, error: str, message: str, headers: dict | None = None) -> web.Response:
    body = json.dumps({"success": False, "error": error, "message": message})
    return web.Response(status=status, text=body, content_type="application/json", headers=headers)


class MiniBooruServer:
    """A running mini-booru server. Use as a context manager or call stop()."""

    def __init__(self, booru_dir: Path, *, host: str = "127.0.0.1", port: int = 0, faults: Faults | None = None,
                 credentials: dict[str, str] | None = None, page_cap: int = 1000, tag_limit: int = 2,
                 gold_logins: Iterable[str] = (), public_url: str | None = None,
                 preload_bytes: int = 256 * 2**20, admin: bool = False):
        booru_dir = Path(booru_dir)
        if not (booru_dir / MARKER).exists():
            raise FileNotFoundError(f"{booru_dir} holds no complete mini-booru (no {MARKER}); run generate_minibooru first")
        self.booru_dir = booru_dir
        self.host, self._port = host, port
        self._faults = faults or Faults()
        self.credentials = dict(credentials) if credentials is not None else None
        self.page_cap = page_cap
        self.tag_limit = tag_limit
        self.gold_logins = set(gold_logins)
        self.admin = admin
        self.stats = ServerStats()
        self._public_url = public_url
        self._store = _Store(booru_dir, preload_bytes)
        self._json_cache: dict[int, bytes] = {}
        self._search_cache: OrderedDict[tuple, tuple[list[int], list[int]]] = OrderedDict()
        self._variant_cache: OrderedDict[tuple[str, str], tuple[bytes, str]] = OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""

    # --- lifecycle -------------------------------------------------------------------------------
    @property
    def faults(self) -> Faults:
        return self._faults

    @faults.setter
    def faults(self, value: Faults) -> None:
        self._faults = value

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        """The prefix put in front of file URLs (public_url if given, else the bound URL)."""
        return (self._public_url or self.url).rstrip("/")

    def start(self) -> "MiniBooruServer":
        started = threading.Event()
        failure: list[BaseException] = []
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(self._start_site())
            except BaseException as exc:  # surfaced to the caller of start()
                failure.append(exc)
                started.set()
                return
            started.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="minibooru-server", daemon=True)
        self._thread.start()
        started.wait(30)
        if failure:
            raise failure[0]
        return self

    async def _start_site(self) -> None:
        app = web.Application()
        r = app.router
        r.add_get("/posts.json", self._h_posts)
        r.add_get(r"/posts/{id:\d+}.json", self._h_post)
        r.add_get("/counts/posts.json", self._h_counts)
        r.add_get("/tags.json", self._h_tags)
        r.add_get("/profile.json", self._h_profile)
        r.add_get("/data/{variant}/{d1}/{d2}/{name}", self._h_file)
        if self.admin:
            r.add_get("/_minibooru/faults", self._h_admin_faults)
            r.add_put("/_minibooru/faults", self._h_admin_faults)
            r.add_get("/_minibooru/stats", self._h_admin_stats)
        r.add_route("*", "/{tail:.*}", self._h_other)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self._port, backlog=1024)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]  # the bound port when port=0
        self._port = sock.getsockname()[1]
        host = self.host if ":" not in self.host else f"[{self.host}]"
        self.url = f"http://{host}:{self._port}"

    def stop(self) -> None:
        if not self._loop or not self._thread:
            return
        if self._runner is not None and self._loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
            try:
                fut.result(timeout=10)
            except Exception:
                pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop = None
        self._thread = None

    def __enter__(self) -> "MiniBooruServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset_stats(self) -> None:
        self.stats = ServerStats()

    # --- edits -----------------------------------------------------------------------------------
    def _edit(self, fn) -> Any:
        """Run fn(store) on the server's loop (between requests, never inside one), then forget cached answers."""
        def apply() -> Any:
            out = fn(self._store)
            self._json_cache.clear()
            self._search_cache.clear()
            return out

        if self._loop is None or not self._loop.is_running():
            return apply()

        async def on_loop() -> Any:
            return apply()

        return asyncio.run_coroutine_threadsafe(on_loop(), self._loop).result(timeout=30)

    def post(self, post_id: int) -> dict:
        """The current record of a post (a copy; KeyError when there is none)."""
        return copy.deepcopy(self._store.posts[post_id])

    def upload(self, posts: Iterable[tuple[dict, bytes | None]]) -> list[int]:
        """New posts (record, original file bytes or None), uploaded now under the next ids; returns the ids."""
        def apply(store: _Store) -> list[int]:
            ids = []
            for post, data in posts:
                new_id = (store.ids_asc[-1] if store.ids_asc else 0) + 1
                store.put(edits.as_upload(post, new_id), data)
                ids.append(new_id)
            return ids

        return self._edit(apply)

    def retag(self, post_id: int, add: Iterable[str] = (), remove: Iterable[str] = (),
              rating: str | None = None) -> dict:
        """A tag (and/or rating) edit of one post; returns the new record."""
        def apply(store: _Store) -> dict:
            post = edits.retag(store.posts[post_id], add, remove, rating, store.categories())
            store.put(post)
            return post

        return self._edit(apply)

    def delete(self, post_id: int) -> dict:
        return self._edit(lambda store: (store.put(post := edits.delete(store.posts[post_id])), post)[1])

    def ban(self, post_id: int) -> dict:
        return self._edit(lambda store: (store.put(post := edits.ban(store.posts[post_id])), post)[1])

    def expunge(self, post_id: int) -> dict:
        """Remove a post and its file for good (later requests: 404 for it, absent from searches)."""
        return self._edit(lambda store: store.drop(post_id))

    # --- helpers ---------------------------------------------------------------------------------
    def _count(self, kind: str, status: int, nbytes: int = 0) -> None:
        self.stats.requests[(kind, status)] += 1
        self.stats.bytes_sent += nbytes

    def _fault_gate(self, request: web.Request, scope: str) -> web.Response | None:
        f = self._faults
        if f.rate_limit_burst > 0 and f.rate_limit_scope in ("all", scope):
            f.rate_limit_burst -= 1
            return _error(429, "RateLimitError", "You are making requests too fast. Please wait and try again.",
                          headers={"Retry-After": str(int(f.retry_after_s))})
        if f.server_error_first_k > 0 and f.server_error_scope in ("all", scope):
            key = request.path + "?" + "&".join(f"{k}={v}" for k, v in sorted(request.query.items())
                                                 if k not in ("login", "api_key"))
            n = f._attempts[key]
            if n < f.server_error_first_k:
                f._attempts[key] = n + 1
                status = f.server_error_statuses[n % len(f.server_error_statuses)] if f.server_error_statuses else 503
                if status == 500:
                    return _error(500, "ActiveRecord::QueryCanceled", "The database timed out running your query.")
                return _error(status, "ServiceUnavailable", "Danbooru is down for maintenance. Try again later.")
        return None

    def _auth(self, request: web.Request) -> tuple[str | None, web.Response | None]:
        login = request.query.get("login")
        key = request.query.get("api_key")
        header = request.headers.get("Authorization", "")
        if header.lower().startswith("basic "):
            try:
                decoded = base64.b64decode(header[6:].strip()).decode("utf-8")
                login, _, key = decoded.partition(":")
            except (ValueError, UnicodeDecodeError):
                return None, _error(401, "SessionLoader::AuthenticationFailure", "Invalid Authorization header")
        login = login or None
        key = key or None
        if login is None and key is None:
            return None, None
        if login is None or key is None:
            return None, _error(401, "SessionLoader::AuthenticationFailure",
                                "You must provide both a login and an API key")
        if self.credentials is not None and self.credentials.get(login) != key:
            return None, _error(401, "SessionLoader::AuthenticationFailure", "Invalid API key")
        return login, None

    async def _api_prelude(self, request: web.Request, kind: str) -> tuple[str | None, web.Response | None]:
        if self._faults.api_delay_s > 0:
            await asyncio.sleep(self._faults.api_delay_s)
            if _client_gone(request):
                return None, web.Response(status=499)
        gate = self._fault_gate(request, "api")
        if gate is not None:
            return None, gate
        return self._auth(request)

    def _respond(self, kind: str, resp: web.Response) -> web.Response:
        self._count(kind, resp.status, len(resp.body) if isinstance(resp.body, (bytes, bytearray)) else 0)
        return resp

    def _absolute(self, post: dict) -> dict:
        base = self.base_url
        p = dict(post)
        for k in ("file_url", "large_file_url", "preview_file_url"):
            if isinstance(p.get(k), str) and p[k].startswith("/"):
                p[k] = base + p[k]
        asset = p.get("media_asset")
        if isinstance(asset, dict) and asset.get("variants"):
            asset = dict(asset)
            asset["variants"] = [{**v, "url": base + v["url"] if v["url"].startswith("/") else v["url"]}
                                 for v in asset["variants"]]
            p["media_asset"] = asset
        return p

    def _post_json(self, pid: int, only: list[str] | None) -> bytes:
        if pid in self._faults.restricted_ids:
            post = hide_file_fields(copy.deepcopy(self._absolute(self._store.posts[pid])))
            if only:
                post = {k: post[k] for k in only if k in post}
            return json.dumps(post, separators=(",", ":")).encode()
        if only:
            post = self._absolute(self._store.posts[pid])
            return json.dumps({k: post[k] for k in only if k in post}, separators=(",", ":")).encode()
        data = self._json_cache.get(pid)
        if data is None:
            data = json.dumps(self._absolute(self._store.posts[pid]), separators=(",", ":")).encode()
            self._json_cache[pid] = data
        return data

    def _search(self, q: Query) -> tuple[list[int], list[int]]:
        """(ids ascending, ids in the requested order) of the posts matching q; cached per query."""
        key = (q.text, q.order)  # predicates are closures: cache by the normalised query text
        hit = self._search_cache.get(key)
        if hit is not None:
            self._search_cache.move_to_end(key)
            return hit
        st = self._store

        def expand(tag: str) -> set[int]:
            if "*" in tag:
                out: set[int] = set()
                for name in fnmatch.filter(st.postings.keys(), tag):
                    out |= st.postings[name]
                return out
            return st.postings.get(tag, set())

        if q.include:
            sets = sorted((expand(t) for t in q.include), key=len)
            cand = set(sets[0])
            for s in sets[1:]:
                cand &= s
        else:
            cand = set(st.ids_asc)
        if q.any_of:
            union: set[int] = set()
            for t in q.any_of:
                union |= expand(t)
            cand &= union
        for t in q.exclude:
            cand -= expand(t)
        if q.preds:
            cand = {pid for pid in cand if all(f(st.posts[pid]) for f in q.preds)}
        asc = sorted(cand)
        if q.order == "id_desc":
            ordered = asc[::-1]
        elif q.order == "id_asc":
            ordered = asc
        elif q.order in ("change_desc", "change_asc"):  # updated_at, then id (Danbooru: posts.updated_at, posts.id)
            changed = {pid: (_stamp(st.posts[pid].get("updated_at")), pid) for pid in asc}
            ordered = sorted(asc, key=changed.__getitem__, reverse=q.order == "change_desc")
        else:
            field_, desc = {"score_desc": ("score", True), "score_asc": ("score", False),
                            "favcount_desc": ("fav_count", True), "favcount_asc": ("fav_count", False)}[q.order]
            ordered = sorted(asc, key=lambda pid: ((-1 if desc else 1) * st.posts[pid][field_], -pid))
        self._search_cache[key] = (asc, ordered)
        if len(self._search_cache) > 256:
            self._search_cache.popitem(last=False)
        return asc, ordered

    def _parse_query(self, text: str, login: str | None) -> Query:
        q = parse_tags(text)
        q.text = " ".join(sorted(text.lower().split()))
        limit = 6 if login is not None and login in self.gold_logins else self.tag_limit
        if q.counted > limit:
            raise QueryError(422, "PostQuery::TagLimitError",
                             f"You cannot search for more than {limit} tags at a time. "
                             "Upgrade your account to search for more tags at once.")
        return q

    @staticmethod
    def _int(value: str | None, default: int, lo: int, hi: int) -> int:
        try:
            return max(lo, min(hi, int(value))) if value not in (None, "") else default
        except ValueError:
            return default

    def _page(self, ids_asc: list[int], ordered: list[int], page: str, limit: int, cap: int) -> list[int]:
        m = re.fullmatch(r"([ab])(\d+)", page.strip().lower()) if page else None
        if m:
            x = int(m.group(2))
            if m.group(1) == "b":
                i = bisect_left(ids_asc, x)
                return ids_asc[max(0, i - limit):i][::-1]
            i = bisect_right(ids_asc, x)
            return ids_asc[i:i + limit][::-1]
        n = self._int(page, 1, 1, 10**9)
        if n > cap:
            raise QueryError(410, "PaginationExtension::PaginationError",
                             f"You cannot go beyond page {cap}. Try narrowing your search terms, "
                             f"or upgrade your account to go beyond page {cap}.")
        return ordered[(n - 1) * limit:n * limit]

    def _log_api(self, request: web.Request, user: str | None) -> None:
        self.stats.api_queries.append({"path": request.path, "tags": request.query.get("tags", ""),
                                       "page": request.query.get("page", ""), "limit": request.query.get("limit", ""),
                                       "user": user})

    # --- handlers --------------------------------------------------------------------------------
    async def _h_posts(self, request: web.Request) -> web.Response:
        user, err = await self._api_prelude(request, "posts")
        if err is not None:
            return self._respond("posts", err)
        self._log_api(request, user)
        try:
            q = self._parse_query(request.query.get("tags", ""), user)
            limit = q.limit if q.limit is not None else self._int(request.query.get("limit"), 20, 1, 200)
            limit = max(1, min(200, limit))
            asc, ordered = self._search(q)
            cap = self.page_cap * 5 if user in self.gold_logins else self.page_cap
            page_ids = self._page(asc, ordered, request.query.get("page", ""), limit, cap)
        except QueryError as exc:
            return self._respond("posts", _error(exc.status, exc.error, exc.message))
        only = [s.strip() for s in request.query["only"].split(",")] if request.query.get("only") else None
        body = b"[" + b",".join(self._post_json(pid, only) for pid in page_ids) + b"]"
        return self._respond("posts", web.Response(body=body, content_type="application/json"))

    async def _h_post(self, request: web.Request) -> web.Response:
        user, err = await self._api_prelude(request, "post")
        if err is not None:
            return self._respond("post", err)
        self._log_api(request, user)
        pid = int(request.match_info["id"])
        if pid not in self._store.posts:
            return self._respond("post", _error(404, "ActiveRecord::RecordNotFound", "That record was not found."))
        only = [s.strip() for s in request.query["only"].split(",")] if request.query.get("only") else None
        return self._respond("post", web.Response(body=self._post_json(pid, only), content_type="application/json"))

    async def _h_counts(self, request: web.Request) -> web.Response:
        user, err = await self._api_prelude(request, "counts")
        if err is not None:
            return self._respond("counts", err)
        self._log_api(request, user)
        try:
            q = self._parse_query(request.query.get("tags", ""), user)
        except QueryError as exc:
            return self._respond("counts", _error(exc.status, exc.error, exc.message))
        asc, _ = self._search(q)
        return self._respond("counts", web.json_response({"counts": {"posts": len(asc)}}))

    async def _h_tags(self, request: web.Request) -> web.Response:
        user, err = await self._api_prelude(request, "tags")
        if err is not None:
            return self._respond("tags", err)
        self._log_api(request, user)
        qs = request.query
        rows = self._store.tags
        if qs.get("search[name_matches]"):
            pats = [p.strip().lower() for p in qs["search[name_matches]"].split(",") if p.strip()]
            rows = [t for t in rows if any(fnmatch.fnmatchcase(t["name"], p) for p in pats)]
        if qs.get("search[name]"):
            names = {n.strip().lower() for n in qs["search[name]"].split(",")}
            rows = [t for t in rows if t["name"] in names]
        if qs.get("search[category]"):
            try:
                cats = {int(c) for c in qs["search[category]"].split(",")}
            except ValueError:
                cats = set()
            rows = [t for t in rows if t["category"] in cats]
        if qs.get("search[hide_empty]", "").lower() in ("true", "1", "yes"):
            rows = [t for t in rows if t["post_count"] > 0]
        order = qs.get("search[order]", "")
        if order == "count":
            rows = sorted(rows, key=lambda t: (-t["post_count"], -t["id"]))
        elif order == "name":
            rows = sorted(rows, key=lambda t: t["name"])
        elif order == "date":
            rows = sorted(rows, key=lambda t: (t["created_at"], t["id"]), reverse=True)
        limit = self._int(qs.get("limit"), 20, 1, 1000)
        page = qs.get("page", "")
        m = re.fullmatch(r"([ab])(\d+)", page.strip().lower()) if page else None
        if m:
            x = int(m.group(2))
            by_id = sorted(rows, key=lambda t: t["id"])
            ids = [t["id"] for t in by_id]
            if m.group(1) == "b":
                i = bisect_left(ids, x)
                out = by_id[max(0, i - limit):i][::-1]
            else:
                i = bisect_right(ids, x)
                out = by_id[i:i + limit][::-1]
        else:
            n = self._int(page, 1, 1, 10**9)
            if n > self.page_cap:
                return self._respond("tags", _error(410, "PaginationExtension::PaginationError",
                                                    f"You cannot go beyond page {self.page_cap}."))
            out = rows[(n - 1) * limit:n * limit]
        return self._respond("tags", web.json_response(out))

    async def _h_profile(self, request: web.Request) -> web.Response:
        user, err = await self._api_prelude(request, "profile")
        if err is not None:
            return self._respond("profile", err)
        if user is None:
            body = {"id": None, "name": "Anonymous", "level": 0, "level_string": "Anonymous",
                    "tag_query_limit": self.tag_limit}
        else:
            gold = user in self.gold_logins
            body = {"id": 100000 + sum(user.encode()) , "name": user, "level": 30 if gold else 20,
                    "level_string": "Gold" if gold else "Member", "created_at": "2015-04-01T12:00:00.000-04:00",
                    "tag_query_limit": 6 if gold else self.tag_limit, "is_banned": False,
                    "per_page": 20}
        return self._respond("profile", web.json_response(body))

    async def _h_other(self, request: web.Request) -> web.Response:
        return self._respond("other", _error(404, "ActionController::RoutingError", f"No route matches {request.path}"))

    async def _h_admin_faults(self, request: web.Request) -> web.Response:
        if request.method == "PUT":
            try:
                self._faults = Faults.from_json(await request.json())
            except (ValueError, TypeError) as exc:
                return self._respond("admin", _error(422, "BadFaults", str(exc)))
        return self._respond("admin", web.json_response(self._faults.to_json()))

    async def _h_admin_stats(self, request: web.Request) -> web.Response:
        s = self.stats
        body = {"requests": [[k, st, n] for (k, st), n in s.requests.items()],
                "file_hits": {str(k): v for k, v in s.file_hits.items()}, "bytes_sent": s.bytes_sent,
                "api_queries": len(s.api_queries)}
        return self._respond("admin", web.json_response(body))

    # --- files -----------------------------------------------------------------------------------
    async def _h_file(self, request: web.Request) -> web.StreamResponse:
        variant = request.match_info["variant"]
        name = request.match_info["name"]
        kind = "original" if variant == "original" else "variant"
        m = re.fullmatch(r"(?:sample-)?([0-9a-f]{32})\.([a-z0-9]+)", name)
        entry = self._store.files.get(m.group(1)) if m else None
        if (not m or entry is None or request.match_info["d1"] != m.group(1)[0:2]
                or request.match_info["d2"] != m.group(1)[2:4]):
            return self._respond(kind, web.Response(status=404, text="404 Not Found", content_type="text/plain"))
        md5, ext = m.group(1), m.group(2)
        pid, orig_ext, _ = entry
        if kind == "original":
            self.stats.file_hits[pid] += 1
        gate = self._fault_gate(request, "image")
        if gate is not None:
            return self._respond(kind, gate)
        f = self._faults
        if pid in f.unavailable_ids:
            return self._respond(kind, _error(503, "ServiceUnavailable", "Danbooru is down for maintenance."))
        if pid in f.missing_ids:
            return self._respond(kind, web.Response(status=404, body=b"<html><body><h1>404 Not Found</h1></body></html>",
                                                    content_type="text/html"))
        if pid in f.slow_ids and f.delay_s > 0:
            await asyncio.sleep(f.delay_s)
            if _client_gone(request):
                return self._respond(kind, web.Response(status=499))
        if pid in f.html_error_ids:
            return self._respond(kind, web.Response(status=200, body=HTML_ERROR_PAGE, content_type="text/html"))

        if kind == "original":
            if ext != orig_ext:
                return self._respond(kind, web.Response(status=404, text="404 Not Found", content_type="text/plain"))
            data, ctype = self._store.file_bytes(md5), CONTENT_TYPES.get(ext, "application/octet-stream")
        else:
            made = self._variant(md5, orig_ext, variant, ext)
            if made is None:
                return self._respond(kind, web.Response(status=404, text="404 Not Found", content_type="text/plain"))
            data, ctype = made
        if pid in f.wrong_bytes_ids:
            data = self._other_bytes(pid, orig_ext)
        if pid in f.truncate_ids:
            half = data[: max(1, len(data) // 2)]
            if f.truncate_mode == "short":
                return self._respond(kind, web.Response(body=half, content_type=ctype))
            resp = web.StreamResponse(status=200, headers={"Content-Type": ctype, "Content-Length": str(len(data))})
            await resp.prepare(request)
            await resp.write(half)
            self._count(kind, 200, len(half))
            if request.transport is not None:
                request.transport.close()
            return resp
        try:
            rng = request.http_range if kind == "original" else slice(None)
        except ValueError:
            rng = slice(None)
        if rng.start is not None or rng.stop is not None:
            start = rng.start or 0
            stop = min(len(data), rng.stop if rng.stop is not None else len(data))
            if start < 0:
                start, stop = max(0, len(data) + start), len(data)
            if start >= len(data):
                return self._respond(kind, web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"}))
            resp = web.Response(status=206, body=data[start:stop], content_type=ctype,
                                headers={"Content-Range": f"bytes {start}-{stop - 1}/{len(data)}", "Accept-Ranges": "bytes"})
            return self._respond(kind, resp)
        return self._respond(kind, web.Response(body=data, content_type=ctype, headers={"Accept-Ranges": "bytes"}))

    def _other_bytes(self, pid: int, ext: str) -> bytes:
        """A different valid file: the next post's image of the same type (any image type if none)."""
        ids = self._store.image_ids.get(ext) or sorted(i for v in self._store.image_ids.values() for i in v)
        others = [i for i in ids if i != pid]
        if not others:
            return b"\xff\xd8\xff\xe0" + b"\x00" * 64  # nothing else to serve: bytes that cannot match
        other = others[bisect_right(others, pid) % len(others)]
        return self._store.file_bytes(self._store.md5_of[other])

    def _variant(self, md5: str, orig_ext: str, variant: str, ext: str) -> tuple[bytes, str] | None:
        """A resized rendition, made on first request and cached (LRU, 512 entries)."""
        key = (md5, variant)
        hit = self._variant_cache.get(key)
        if hit is not None:
            return hit
        boxes = {"180x180": (180, 180, "jpg"), "360x360": (360, 360, "jpg"), "720x720": (720, 720, "webp"),
                 "sample": (850, None, "jpg" if orig_ext != "zip" else "webm"), "full": (None, None, "jpg")}
        if variant not in boxes or orig_ext == "swf":
            return None
        mw, mh, vext = boxes[variant]
        if vext != ext or (variant == "full" and orig_ext != "webp"):
            return None
        if orig_ext in ("mp4", "zip"):
            post = self._store.posts[self._store.files[md5][0]]
            img = placeholder(post["image_width"], post["image_height"])
            if variant == "sample":
                return None  # webm samples of ugoira are not simulated
        else:
            img = Image.open(io.BytesIO(self._store.file_bytes(md5)))
            img.load()
        if mw or mh:
            w, h = img.size
            scale = min((mw or w) / w, (mh or h) / h, 1.0)
            img = img.convert("RGB").resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
        buf = io.BytesIO()
        if vext == "webp":
            img.convert("RGB").save(buf, "WEBP", quality=75, method=0)
        else:
            img.convert("RGB").save(buf, "JPEG", quality=85)
        out = (buf.getvalue(), CONTENT_TYPES[vext])
        self._variant_cache[key] = out
        if len(self._variant_cache) > 512:
            self._variant_cache.popitem(last=False)
        return out


def serve_minibooru(booru_dir: Path, *, host: str = "127.0.0.1", port: int = 0, faults: Faults | None = None,
                    credentials: dict[str, str] | None = None, page_cap: int = 1000, tag_limit: int = 2,
                    gold_logins: Iterable[str] = (), public_url: str | None = None,
                    preload_bytes: int = 256 * 2**20, admin: bool = False) -> MiniBooruServer:
    """Start a Danbooru-compatible server for a generated mini-booru in a background thread."""
    server = MiniBooruServer(booru_dir, host=host, port=port, faults=faults, credentials=credentials,
                             page_cap=page_cap, tag_limit=tag_limit, gold_logins=gold_logins, public_url=public_url,
                             preload_bytes=preload_bytes, admin=admin)
    return server.start()


__all__ = ["Faults", "MiniBooruServer", "ServerStats", "serve_minibooru", "parse_tags"]
