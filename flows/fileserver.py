"""Read-only HTTP server over the data root, so Prefect image artifacts (URLs only) can show stage images.

Serves only regular files that resolve inside the root: `..`, absolute paths, symlinks that leave the
root, hidden files and secret-looking files (.env, *.key, secrets*) are refused with 403/404.
Bound to loopback by default; off unless `fm up` / `fm serve --files` starts it.
"""
from __future__ import annotations

import mimetypes
import posixpath
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

REFUSED_NAMES = (".env", "secrets", "secret", "credentials")
REFUSED_SUFFIXES = (".env", ".key", ".pem", ".secret", ".token")


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


def _handler(root: Path):
    class Handler(BaseHTTPRequestHandler):
        server_version = "booruflow-files"

        def do_GET(self) -> None:  # noqa: N802
            self._serve(body=True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._serve(body=False)

        def _serve(self, body: bool) -> None:
            path = resolve_request(root, self.path)
            if path is None:
                self.send_error(HTTPStatus.NOT_FOUND, "not found")
                return
            data = path.read_bytes()
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", mimetypes.guess_type(path.name)[0] or "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Access-Control-Allow-Origin", "*")  # the Prefect UI runs on another port
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            if body:
                self.wfile.write(data)

        def do_POST(self) -> None:  # noqa: N802
            self.send_error(HTTPStatus.METHOD_NOT_ALLOWED)

        do_PUT = do_DELETE = do_POST

        def log_message(self, format: str, *args) -> None:  # quiet: Prefect logs are the record
            pass

    return Handler


class FileServer:
    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.httpd = ThreadingHTTPServer((host, port), _handler(self.root))
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
