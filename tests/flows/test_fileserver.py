import os
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
