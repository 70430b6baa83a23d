import hashlib
import http.client
import os
import tracemalloc
import urllib.error
import urllib.request

import pytest

from flows.fileserver import FileServer


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


@pytest.fixture()
def served(tmp_path):
    root = tmp_path / "root"
    (root / "bucket" / "fp1").mkdir(parents=True)
    (root / "bucket" / "fp1" / "sheet.png").write_bytes(b"\x89PNG fake")
    (root / ".env").write_text("DANBOORU_API_KEY=hunter2")
    (root / "secrets.yaml").write_text("api_key: hunter2")
    (root / "bucket" / "fp1" / "creds.key").write_text("hunter2")
    outside = tmp_path / "outside.txt"
    outside.write_text("private")
    os.symlink(outside, root / "bucket" / "fp1" / "escape.txt")
    os.symlink(root / "bucket" / "fp1" / "sheet.png", root / "bucket" / "inside-link.png")
    with FileServer(root) as server:
        yield server


def test_serves_files_inside_root(served):
    status, body = get(f"{served.url}/bucket/fp1/sheet.png")
    assert status == 200 and body == b"\x89PNG fake"
    status, body = get(f"{served.url}/bucket/inside-link.png")  # a link that stays inside is fine
    assert status == 200


@pytest.mark.parametrize("path", [
    "/../outside.txt", "/bucket/../../outside.txt", "/bucket/%2e%2e/%2e%2e/outside.txt",
    "/bucket/fp1/escape.txt", "/.env", "/secrets.yaml", "/bucket/fp1/creds.key", "/bucket/fp1", "/",
    "/bucket/fp1/missing.png",
])
def test_refuses_traversal_symlinks_out_secrets_and_folders(served, path):
    status, body = get(f"{served.url}{path}")
    assert status == 404 and b"hunter2" not in body and b"private" not in body


def test_read_only(served):
    req = urllib.request.Request(f"{served.url}/bucket/fp1/sheet.png", data=b"x", method="PUT")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)
    assert err.value.code == 405


def request(server: FileServer, path: str, headers: dict[str, str] | None = None, method: str = "GET",
            host: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """A raw request with exactly the Host/Origin headers given (http.client, no redirects, no proxies)."""
    _, port = server.httpd.server_address[:2]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True)
        if host is not None:
            conn.putheader("Host", host)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_host_header_must_name_this_server(served):
    port = served.httpd.server_address[1]
    for ok in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}"):
        status, _, body = request(served, "/bucket/fp1/sheet.png", host=ok)
        assert status == 200 and body == b"\x89PNG fake", ok
    # DNS rebinding (a page on evil.example resolved to 127.0.0.1), another port, no port, no Host at all
    for bad in (f"evil.example:{port}", "evil.example", f"127.0.0.1:{port + 1}", "127.0.0.1", None):
        status, _, body = request(served, "/bucket/fp1/sheet.png", host=bad)
        assert status == 421 and b"PNG" not in body, bad


@pytest.fixture()
def no_prefect_env(monkeypatch):
    monkeypatch.delenv("PREFECT_UI_URL", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)


def test_cors_only_for_the_prefect_ui_origin(tmp_path, no_prefect_env):
    (tmp_path / "a.png").write_bytes(b"png")
    with FileServer(tmp_path) as server:
        host = "127.0.0.1:%d" % server.httpd.server_address[1]
        for origin in ("http://127.0.0.1:4200", "http://localhost:4200"):
            status, headers, _ = request(server, "/a.png", {"Origin": origin}, host=host)
            assert status == 200 and headers["access-control-allow-origin"] == origin
        for origin in ("http://evil.example", "http://127.0.0.1:4201", "null"):
            status, headers, body = request(server, "/a.png", {"Origin": origin}, host=host)
            assert "access-control-allow-origin" not in headers, origin  # the browser keeps the body from the page
        status, headers, _ = request(server, "/a.png", host=host)  # same-origin / <img>: no Origin, no header
        assert status == 200 and "access-control-allow-origin" not in headers


def test_cors_origin_follows_prefect_api_url(tmp_path, no_prefect_env, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4321/api")
    (tmp_path / "a.png").write_bytes(b"png")
    with FileServer(tmp_path) as server:
        host = "127.0.0.1:%d" % server.httpd.server_address[1]
        _, headers, _ = request(server, "/a.png", {"Origin": "http://localhost:4321"}, host=host)
        assert headers.get("access-control-allow-origin") == "http://localhost:4321"
        _, headers, _ = request(server, "/a.png", {"Origin": "http://127.0.0.1:4200"}, host=host)
        assert "access-control-allow-origin" not in headers


def test_large_file_is_streamed_not_read_whole(tmp_path):
    size_mib = 48
    digest = hashlib.sha256()
    with open(tmp_path / "big.bin", "wb") as fh:
        for i in range(size_mib):  # every MiB different, so order and completeness are checked
            block = bytes([i]) * (1 << 20)
            fh.write(block)
            digest.update(block)
    with FileServer(tmp_path) as server:
        host = "127.0.0.1:%d" % server.httpd.server_address[1]
        status, headers, body = request(server, "/big.bin", method="HEAD", host=host)
        assert status == 200 and headers["content-length"] == str(size_mib << 20) and body == b""

        conn = http.client.HTTPConnection("127.0.0.1", server.httpd.server_address[1], timeout=30)
        tracemalloc.start()
        try:
            conn.request("GET", "/big.bin")
            resp = conn.getresponse()
            assert resp.status == 200 and resp.getheader("Content-Length") == str(size_mib << 20)
            got, n = hashlib.sha256(), 0
            while chunk := resp.read(1 << 16):
                got.update(chunk)
                n += len(chunk)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            conn.close()
    assert n == size_mib << 20 and got.hexdigest() == digest.hexdigest()
    # the server held a chunk at a time (both threads are traced): far below the file's 48 MiB
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB while serving a {size_mib} MiB file"
