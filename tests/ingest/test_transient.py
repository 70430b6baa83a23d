"""Transient download failures are never frozen into a committed output.

- timeouts / dropped connections / 5xx after every retry leave the post pending: the stage fails with a message
  naming how many and why, commits nothing, and a rerun retries exactly those posts;
- a kill matrix over the embedded mini-booru (a new port on every run, so every resumed download needs its URL
  re-pointed): kill -9 at five points, from right after the first page to the end of the crawl, then rerun:
  posts.parquet and rejects.parquet equal an uninterrupted run's, under the same fingerprint.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from data_contracts.errors import StageError
from pipeline_config.load import load_config
from tasks.ingest.ledger import is_final
from tasks.ingest.reasons import is_transient
from tests.ingest.test_stage import make_cfg, outputs, run

REPO = Path(__file__).resolve().parents[2]


def test_a_cut_in_the_image_header_is_truncated_not_an_html_page(tmp_path):
    from tasks.ingest.download import short_body
    from tasks.ingest.parse import Post
    from tasks.ingest.reasons import Reject

    post = Post(1, "0" * 32, None, 0, 0, 0, 0, "g", 64, 64, "jpg", 5000, None, None, (), (), (), (), (), "x",
                False, False, False, False)
    stump, page = tmp_path / "stump", tmp_path / "page"
    stump.write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 100)  # 104 of 5000 bytes, cut inside the JPEG header
    page.write_bytes(b"<html>busy</html>")
    decoded = Reject("not_an_image", "UnidentifiedImageError")
    cut = short_body(decoded, post, 104, stump)
    assert cut.reason == "truncated" and "received 104 of 5000 bytes" in cut.detail
    assert short_body(decoded, post, 17, page) == decoded  # an HTML error page is no image at all
    assert short_body(decoded, post, 5000, stump) == decoded  # all bytes came: the file itself is broken


def test_transient_reasons():
    assert all(is_transient(r) for r in ("timeout", "connection_error", "http_429", "http_500", "http_503"))
    assert not any(is_transient(r) for r in ("http_404", "http_403", "md5_mismatch", "truncated", "not_an_image",
                                             "http_5xx", "http_5"))
    assert not is_final({"id": 1, "ok": False, "reason": "timeout"})
    assert is_final({"id": 1, "ok": False, "reason": "http_404"}) and is_final({"id": 1, "ok": True})


def test_transient_failures_stay_pending_and_a_rerun_fetches_them(minibooru, minibooru_server, tmp_path):
    ingest = {"queries": [{"tags": "", "quota": 1000}], "api": {"timeout_s": 0.3, "max_retries": 1}}
    ref, ref_store = run(make_cfg(tmp_path / "ref", minibooru_server.url, **ingest))
    ref_posts, ref_rejects, _ = outputs(ref, ref_store)
    ids = sorted(ref_posts.column("id").to_pylist())
    slow, down = set(ids[:3]), set(ids[3:5])

    minibooru_server.reset_stats()
    minibooru_server.faults.slow_ids, minibooru_server.faults.delay_s = slow, 1.0  # a timeout on every retry
    minibooru_server.faults.unavailable_ids = down  # 503 on every retry
    cfg = make_cfg(tmp_path / "run", minibooru_server.url, **ingest)
    with pytest.raises(StageError) as err:
        run(cfg)
    text = str(err.value)
    assert "5 post(s) could not be downloaded for now" in text, text
    assert "timeout 3" in text and "http_503 2" in text and "nothing was committed" in text
    store_root = Path(cfg.data_root)
    assert not (store_root / "ingest" / "CURRENT").exists()  # no output, no pointer to one
    assert not [p for p in (store_root / "ingest").iterdir() if p.name not in ("_work", ".lock")]

    # The network is back: the rerun fetches the five pending posts and nothing it already had.
    hits_before = dict(minibooru_server.stats.file_hits)
    minibooru_server.faults.slow_ids, minibooru_server.faults.unavailable_ids = set(), set()
    outcome, store = run(cfg)
    posts, rejects, _ = outputs(outcome, store)
    assert posts.equals(ref_posts) and rejects.equals(ref_rejects)
    assert outcome.manifest.fingerprint == ref.manifest.fingerprint
    refetched = {i for i, n in minibooru_server.stats.file_hits.items() if n > hits_before.get(i, 0)}
    assert refetched == slow | down


# --- the kill matrix ------------------------------------------------------------------------------------------

CHILD = """
import json, sys
from data_contracts.store import ArtifactStore
from pipeline_config.load import load_config
from tasks.common.stage import run_stage
from tasks.ingest.stage import SPEC
cfg = load_config(json.loads(sys.argv[1]))
out = run_stage(SPEC, cfg, ArtifactStore(cfg.data_root, local_cache=cfg.runtime.cache_dir))
print(json.dumps({"fingerprint": out.manifest.fingerprint, "posts": out.manifest.row_counts["posts"]}))
"""


def _journal(root: Path, name: str) -> list[dict]:
    records = []
    for path in root.glob(f"ingest/_work/*/journal/{name}"):
        for line in path.read_bytes().splitlines(keepends=True):
            if line.endswith(b"\n") and line.strip():
                records.append(json.loads(line))
    return records


def _embedded_tree(root: Path, cache: Path) -> dict:
    # Paced so that every kill point below is reached while the child runs (pages 8/s, files 40/s).
    return {"data_root": str(root), "runtime": {"cache_dir": str(cache)},
            "ingest": {"api": {"base_url": "embedded:minibooru", "page_limit": 10, "requests_per_s": 8,
                               "downloads_per_s": 40, "concurrency": 2, "backoff_s": 0.01, "backoff_max_s": 0.05,
                               "slowdown_s": 0.1},
                       "queries": [{"tags": "1girl", "quota": 1000}, {"tags": "", "quota": 1000, "name": "rest"}],
                       "verify": {"mode": "thread"}, "filters": {"min_width": 0, "min_height": 0},
                       "embedded": {"posts": 90, "seed": 3, "max_side": 256}}}


def _run_child(tree: dict, tmp: Path) -> subprocess.Popen:
    script = tmp / "child.py"
    script.write_text(CHILD)
    return subprocess.Popen([sys.executable, str(script), json.dumps(tree)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def _kill_at(proc: subprocess.Popen, ready, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before the kill point '{what}': {proc.stderr.read().decode()[-2000:]}")
        assert time.monotonic() < deadline, f"kill point '{what}' not reached"
        time.sleep(0.01)
    children = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    psutil.wait_procs(children, timeout=10)


def test_kill_matrix_on_the_embedded_booru_loses_no_post(tmp_path_factory, tmp_path):
    cache = tmp_path_factory.mktemp("kill-matrix-cache")
    ref_tree = _embedded_tree(tmp_path / "ref", cache)
    from tasks.common.stage import run_stage
    from data_contracts.store import ArtifactStore
    from tasks.ingest.stage import SPEC

    ref_cfg = load_config(ref_tree)
    ref = run_stage(SPEC, ref_cfg, ArtifactStore(ref_cfg.data_root, local_cache=cache))
    ref_dir = Path(ref.output_path)
    ref_posts = pq.read_table(ref_dir / "posts.parquet")
    ref_rejects = pq.read_table(ref_dir / "rejects.parquet")
    assert ref_posts.num_rows > 40

    root = tmp_path / "run"
    tree = _embedded_tree(root, cache)
    n = ref_posts.num_rows
    points = [
        ("right after the first page", lambda: len(_journal(root, "pages.jsonl")) >= 1),
        ("three pages in", lambda: len(_journal(root, "pages.jsonl")) >= 3),
        ("a few downloads done", lambda: len(_journal(root, "downloads.jsonl")) >= 5),
        ("half the downloads done", lambda: len(_journal(root, "downloads.jsonl")) >= n // 2),
        ("the crawl finished", lambda: sum(bool(r.get("done")) for r in _journal(root, "pages.jsonl")) >= 2),
    ]
    for k, (what, ready) in enumerate(points):  # each kill lands inside an attempt that has started its work
        started = lambda k=k: len(_journal(root, "attempts.jsonl")) > k  # noqa: E731
        _kill_at(_run_child(tree, tmp_path), lambda: started() and ready(), what)
    proc = _run_child(tree, tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-3000:]
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result["fingerprint"] == ref.manifest.fingerprint
    final = root / "ingest" / result["fingerprint"]
    assert pq.read_table(final / "posts.parquet").equals(ref_posts)
    assert pq.read_table(final / "rejects.parquet").equals(ref_rejects)
    assert "connection_error" not in pq.read_table(final / "rejects.parquet").column("reason").to_pylist()
    # the report counts the killed attempts' work too (their in-memory HTTP counters died with them)
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["stats"]["run"]["attempts"] == len(points) + 1
    ref_stats = ref.manifest.stats
    assert manifest["stats"]["all_attempts"]["pages"] == ref_stats["all_attempts"]["pages"]
    assert manifest["stats"]["all_attempts"]["files_fetched"] >= ref_stats["all_attempts"]["files_fetched"] > 0
    summary = json.loads((final / "report.json").read_text())["summary_md"]
    assert f"Resumed: {len(points) + 1} attempts" in summary


# --- two runs at once on one data root ------------------------------------------------------------------------

def test_two_concurrent_runs_on_one_data_root(tmp_path_factory, tmp_path):
    """The second run waits for the first's stage lock, then finds its complete output; inspect agrees."""
    cache = tmp_path_factory.mktemp("concurrent-cache")
    root = tmp_path / "data"
    tree = _embedded_tree(root, cache)
    first = _run_child(tree, tmp_path)
    deadline = time.monotonic() + 60
    while not _journal(root, "pages.jsonl"):  # the first run is crawling: it holds the lock
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read().decode()[-2000:]
        time.sleep(0.01)
    second = _run_child(tree, tmp_path)
    out1, err1 = first.communicate(timeout=120)
    out2, err2 = second.communicate(timeout=120)
    assert first.returncode == 0, err1.decode()[-3000:]
    assert second.returncode == 0, err2.decode()[-3000:]
    r1, r2 = (json.loads(o.decode().strip().splitlines()[-1]) for o in (out1, out2))
    assert r1 == r2
    manifest = json.loads((root / "ingest" / r1["fingerprint"] / "manifest.json").read_text())
    assert {"posts.parquet", "rejects.parquet"} <= {f["path"] for f in manifest["files"]}
    inspect = subprocess.run([sys.executable, "-m", "flows.cli", "inspect", "ingest", "-o", f"data_root={root}",
                              "--no-json"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert inspect.returncode == 0, inspect.stderr
    assert f"posts={r1['posts']}" in inspect.stdout
