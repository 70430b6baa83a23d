"""Read-only HTTP server over the data root, so Prefect image artifacts (URLs only) can show stage images.

Serves only regular files that resolve inside the root: `..`, absolute paths, symlinks that leave the
root, hidden files and secret-looking files (.env, *.key, secrets*) are refused with 403/404.
Bound to loopback by default; off unless `fm up` / `fm serve --files` starts it.

Browser-facing defences, since any web page the user opens can make the browser talk to loopback:
- the Host header must name this server by a loopback name (or the bound host) and its port, else 421:
  a DNS-rebinding page (evil.example resolving to 127.0.0.1) sends its own name and is refused;
- CORS is granted only to the Prefect UI's origin (PREFECT_UI_URL / PREFECT_API_URL, else
  http://127.0.0.1:4200 and http://localhost:4200), never `*`; other origins get no CORS header.
Files are streamed in chunks with a Content-Length, never read whole into memory.
"""
from __future__ import annotations

import mimetypes
import os
import posixpath
import shutil
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterable, Mapping
from urllib.parse import unquote, urlsplit

REFUSED_NAMES = (".env", "secrets", "secret", "credentials")
REFUSED_SUFFIXES = (".env", ".key", ".pem", ".secret", ".token")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
DEFAULT_UI_ORIGINS = ("http://127.0.0.1:4200", "http://localhost:4200")
CHUNK = 1 << 20  # bytes per write while streaming a file


def resolve_request(root: Path, url_path: str) -> Path | None:
    """The file a URL path names, or None when it must not be served."""
    raw = unquote(urlsplit(url_path).path)
    parts = [p for p in raw.split("/") if p]
    if any(p in ("..", ".") or p.startswith(".") or "\\" in p or "\x00" in p for p in parts):
        return None
    name = parts[-1].lower() if parts else ""
    if any(name.startswith(n) for n in REFUSED_NAMES) or name.endswith(REFUSED_SUFFIXES):
        return None
    root = root.resolve()
    candidate = (root / posixpath.join(*parts)) if parts else root
    try:
        real = candidate.resolve(strict=True)
    except (FileNotFoundError, RuntimeError, OSError):
        return None
    if not real.is_relative_to(root) or not real.is_file():
        return None
    return real


def _origin_of(url: str) -> str | None:
    """scheme://host[:port] of a URL, lower-case; None when it is not an http(s) URL."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def _loopback_aliases(origin: str) -> set[str]:
    """An origin plus its spellings with the other loopback names (the UI may be opened either way)."""
    parts = urlsplit(origin)
    host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else parts.hostname
    if host not in LOOPBACK_NAMES:
        return {origin}
    port = f":{parts.port}" if parts.port else ""
    return {f"{parts.scheme}://{name}{port}" for name in LOOPBACK_NAMES}


def ui_origins(env: Mapping[str, str] | None = None) -> frozenset[str]:
    """The Prefect UI origins allowed to read files cross-origin: from PREFECT_UI_URL / PREFECT_API_URL
    (the UI is served by the API server), else the default local server on port 4200."""
    env = os.environ if env is None else env
    found = {o for key in ("PREFECT_UI_URL", "PREFECT_API_URL") if (o := _origin_of(env.get(key, "")))}
    origins = set()
    for origin in found or DEFAULT_UI_ORIGINS:
        origins |= _loopback_aliases(origin)
    return frozenset(origins)


def allowed_hosts(bound_host: str, port: int) -> frozenset[str]:
    """Host header values that name this server: loopback names and the bound host, with its port
    (lower-case; a bare name only when the port is HTTP's default)."""
    bound = f"[{bound_host}]" if ":" in bound_host else bound_host
    names = {n.lower() for n in (*LOOPBACK_NAMES, bound) if n not in ("0.0.0.0", "[::]", "")}
    hosts = {f"{n}:{port}" for n in names}
    return frozenset(hosts | (names if port == 80 else set()))


def _handler(root: Path, hosts: frozenset[str], origins: frozenset[str]):
    class Handler(BaseHTTPRequestHandler):
        server_version = "booruflow-files"

        def do_GET(self) -> None:  # noqa: N802
            self._serve(body=True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._serve(body=False)

        def _host_ok(self) -> bool:
            return (self.headers.get("Host") or "").strip().lower() in hosts

        def _serve(self, body: bool) -> None:
            if not self._host_ok():  # DNS rebinding: the page's own name, not ours
                self.send_error(HTTPStatus.MISDIRECTED_REQUEST, "unknown Host")
                return
            path = resolve_request(root, self.path)
            if path is None:
                self.send_error(HTTPStatus.NOT_FOUND, "not found")
                return
            try:
                fh = open(path, "rb")
            except OSError:
                self.send_error(HTTPStatus.NOT_FOUND, "not found")
                return
            with fh:
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", mimetypes.guess_type(path.name)[0] or "application/octet-stream")
                self.send_header("Content-Length", str(os.fstat(fh.fileno()).st_size))  # of the file we send
                origin = self.headers.get("Origin")
                if origin and origin.lower() in origins:  # the Prefect UI runs on another port
                    self.send_header("Access-Control-Allow-Origin", origin)
                self.send_header("Vary", "Origin")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                if body:
                    shutil.copyfileobj(fh, self.wfile, CHUNK)

        def do_POST(self) -> None:  # noqa: N802
            self.send_error(HTTPStatus.METHOD_NOT_ALLOWED)

        do_PUT = do_DELETE = do_PATCH = do_POST

        def log_message(self, format: str, *args) -> None:  # quiet: Prefect logs are the record
            pass

    return Handler


class FileServer:
    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 0,
                 origins: Iterable[str] | None = None) -> None:
        """origins: browser origins allowed to read files cross-origin (default: the Prefect UI's, see
        `ui_origins`)."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.origins = frozenset(o.lower() for o in (ui_origins() if origins is None else origins))
        self.httpd = ThreadingHTTPServer((host, port), BaseHTTPRequestHandler)
        self.hosts = allowed_hosts(host, self.httpd.server_address[1])  # the port, once bound (port 0)
        self.httpd.RequestHandlerClass = _handler(self.root, self.hosts, self.origins)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="booruflow-files", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FileServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "FileServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
