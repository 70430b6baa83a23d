"""`tag.model` as a Hugging Face repo id: read from the local HF cache without a network call when the tagger
files are there, downloaded only when missing and online, a clear ConfigError otherwise; resolved once per
process. The Hub is a real loopback HTTP server that records every request it gets."""
from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from data_contracts.errors import ConfigError
from tasks.common.process_cache import ProcessCache
from tasks.tag import model as tag_model
from tasks.tag.model import LABELS_NAME, ONNX_NAME, resolve_model

REPO = "SmilingWolf/wd-swinv2-tagger-v3"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class RecordingHub:
    """A loopback stand-in for huggingface.co: records (method, path) and answers `status` to everything."""

    def __init__(self, status: int = 404):
        self.requests: list[tuple[str, str]] = []
        self.status = status
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                hub.requests.append((self.command, self.path))
                body = json.dumps({"error": "Repository not found" if hub.status == 404 else "boom"}).encode()
                self.send_response(hub.status)
                if hub.status == 404:
                    self.send_header("X-Error-Code", "RepoNotFound")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_POST = _answer

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty HF cache in tmp, the Hub endpoint pointed at a recording server, online, fresh memo."""
    from huggingface_hub import constants

    server = RecordingHub()
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(tag_model, "_HUB_FOLDERS", ProcessCache("test hub folders"))
    yield server, cache
    server.close()


def cache_repo(cache: Path, repo: str, files_from: Path, names: list[str] | None = None) -> Path:
    """The layout huggingface_hub writes: models--org--name/refs/main -> commit, snapshots/<commit>/files."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(COMMIT)
    for f in sorted(files_from.iterdir()):
        if names is None or f.name in names:
            shutil.copy2(f, snapshot / f.name)
    return snapshot


def test_a_cached_repo_is_used_without_any_request_and_resolved_once(hub, tiny_folder, tmp_path):
    server, cache = hub
    snapshot = cache_repo(cache, REPO, tiny_folder)
    first = resolve_model(REPO, tmp_path / "cache")
    assert first.path == snapshot and first.name == REPO
    assert first.onnx_path == snapshot / ONNX_NAME and first.weights_path is not None
    assert len(first.labels) > 10_000
    assert server.requests == []

    # the second resolution is the memo: it no longer even reads refs/main
    (snapshot.parents[1] / "refs" / "main").unlink()
    second = resolve_model(REPO, tmp_path / "cache")
    assert second.path == snapshot
    assert tag_model._HUB_FOLDERS.peek((REPO, str(cache))) == snapshot
    assert server.requests == []

    # a kept folder whose files went away is resolved again, not handed out
    shutil.rmtree(snapshot.parents[1])
    with pytest.raises(ConfigError, match="could not be fetched"):
        resolve_model(REPO, tmp_path / "cache")


def test_a_cached_onnx_only_snapshot_is_enough(hub, tiny_folder, tmp_path):
    server, cache = hub
    snapshot = cache_repo(cache, REPO, tiny_folder, names=[LABELS_NAME, ONNX_NAME])
    folder = resolve_model(REPO, tmp_path / "cache")
    assert folder.path == snapshot and folder.onnx_path is not None and folder.weights_path is None
    assert server.requests == []


def test_offline_and_missing_names_the_folder_layout(hub, tmp_path, monkeypatch):
    server, cache = hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as err:
        resolve_model("someone/not-cached", tmp_path / "cache")
    text = str(err.value)
    assert "offline" in text and "selected_tags.csv" in text and "model.onnx" in text
    assert str(cache / "models--someone--not-cached" / "snapshots") in text
    assert server.requests == []
    assert tag_model._HUB_FOLDERS.peek(("someone/not-cached", str(cache))) is None


@pytest.mark.parametrize("status", [404, 500])
@pytest.mark.parametrize("cached", ["nothing", "labels only"])
def test_online_and_missing_asks_the_hub_and_fails_clearly(hub, tiny_folder, tmp_path, status, cached):
    server, cache = hub
    server.status = status
    if cached == "labels only":  # a snapshot without any model file is not a tagger: the Hub is asked
        cache_repo(cache, REPO, tiny_folder, names=[LABELS_NAME])
    with pytest.raises(ConfigError) as err:
        resolve_model(REPO, tmp_path / "cache")
    assert any(path.startswith(f"/api/models/{REPO}") for _, path in server.requests), server.requests
    text = str(err.value)
    assert REPO in text and "selected_tags.csv" in text and "model.onnx" in text
    assert ("could not be fetched" if cached == "nothing" else "holds only selected_tags.csv even after asking") in text
    assert tag_model._HUB_FOLDERS.peek((REPO, str(cache))) is None
