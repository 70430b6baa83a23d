"""Nothing lost under concurrent runs or forced rebuilds.

- the stage lock: a second run waits (and says who holds it) or fails clearly; a killed holder frees it; the
  object-store lease is taken over only when its heartbeat is stale;
- a commit never replaces a complete output unless it is a forced rebuild;
- fingerprints follow upstream content: a forced upstream rebuild with other rows reruns its downstream, one
  with the same rows (other report/pictures) keeps it cached;
- `fm inspect` finds a manifest that promises rows no file holds, and unlisted files.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from data_contracts.errors import StageError
from data_contracts.ingest import IngestManifest
from data_contracts.lock import StageLock
from data_contracts.store import ArtifactStore
from data_contracts.verify import verify_output
from pipeline_config.load import load_config
from tasks.common.stage import compute_fingerprint, is_cached, run_stage
from tasks.quality.stage import SPEC as QUALITY
from tests.quality.data import commit_ingest, commit_tags, random_posts, tags_table
from tests.stage_helpers import commit_output

REPO = Path(__file__).resolve().parents[2]


# --- the lock ------------------------------------------------------------------------------------------------

def in_thread(fn):
    """fn() in another thread (another holder as far as the lock is concerned): its result or exception."""
    out: list = []

    def target() -> None:
        try:
            out.append(fn())
        except Exception as exc:  # noqa: BLE001
            out.append(exc)

    t = threading.Thread(target=target)
    t.start()
    t.join(10)
    return out[0]


def test_a_second_holder_waits_and_is_told_who_holds_it(tmp_path, caplog):
    store = ArtifactStore(str(tmp_path / "data"))
    order: list[str] = []
    first = StageLock(store, "tag", note="first").acquire()

    def second() -> None:
        with StageLock(store, "tag", poll_s=0.05, report_every_s=0.1, log=logging.getLogger("t.second")):
            order.append("second")

    caplog.set_level(logging.INFO, logger="t.second")
    thread = threading.Thread(target=second)
    thread.start()
    time.sleep(0.5)
    assert order == [] and thread.is_alive()  # another thread of this process waits like any other run
    order.append("first")
    first.release()
    thread.join(5)
    assert order == ["first", "second"]
    waiting = [r.getMessage() for r in caplog.records if "waiting for the stage lock" in r.getMessage()]
    assert waiting and f"pid {os.getpid()}" in waiting[0] and "first" in waiting[0]


def test_no_wait_fails_with_the_holder_and_nesting_in_one_thread_is_free(tmp_path):
    store = ArtifactStore(str(tmp_path / "data"))
    with StageLock(store, "cache", note="the holder"):
        with StageLock(store, "cache"):  # the same thread again: no deadlock
            pass
        errors: list[Exception] = []

        def other() -> None:
            try:
                StageLock(store, "cache", wait_s=0).acquire()
            except StageError as exc:
                errors.append(exc)

        t = threading.Thread(target=other)
        t.start()
        t.join(5)
        assert errors and "is locked by" in str(errors[0]) and "the holder" in str(errors[0])
    StageLock(store, "cache", wait_s=0).acquire().release()  # released for good after the outer block


HOLD = """
import sys, time
from data_contracts.lock import StageLock
from data_contracts.store import ArtifactStore
lock = StageLock(ArtifactStore(sys.argv[1]), "train").acquire()  # kept referenced: held until killed
print("held", flush=True)
time.sleep(60)
"""


def test_a_killed_holder_frees_the_lock(tmp_path):
    root = str(tmp_path / "data")
    proc = subprocess.Popen([sys.executable, "-c", HOLD, root], cwd=REPO, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == b"held"
    with pytest.raises(StageError, match=f"pid {proc.pid}"):
        StageLock(ArtifactStore(root), "train", wait_s=0).acquire()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    StageLock(ArtifactStore(root), "train", wait_s=0).acquire().release()


def test_object_store_lease_heartbeat_and_stale_takeover(tmp_path):
    store = ArtifactStore("memory://bf-lease-test/root", local_cache=tmp_path / "cache")
    now = [1000.0]
    holder = StageLock(store, "bucket", settle_s=0, heartbeat_s=3600, stale_after_s=60, clock=lambda: now[0],
                       note="holder").acquire()
    lease = json.loads(store.fs.cat_file(store.output_path("bucket", "_lock.json")))
    assert lease["note"] == "holder" and lease["heartbeat"] == 1000.0
    other = StageLock(store, "bucket", settle_s=0, wait_s=0, stale_after_s=60, clock=lambda: now[0])
    assert "holder" in str(in_thread(other.acquire))  # another run (thread) is refused, told who holds it
    now[0] += 61  # the holder stopped beating (killed): the lease is stale and may be taken over
    taker = StageLock(store, "bucket", settle_s=0, wait_s=0, stale_after_s=60, clock=lambda: now[0], note="taker")
    assert in_thread(taker.acquire) is taker
    assert json.loads(store.fs.cat_file(store.output_path("bucket", "_lock.json")))["note"] == "taker"
    holder.release()  # no longer its lease: it must not delete the taker's
    assert store.fs.exists(store.output_path("bucket", "_lock.json"))
    in_thread(taker.release)
    assert not store.fs.exists(store.output_path("bucket", "_lock.json"))


# --- commits and content identity ---------------------------------------------------------------------------

def _quality_inputs(tmp_path):
    store = ArtifactStore(str(tmp_path / "data"))
    rows = random_posts(200)
    commit_ingest(store, rows)
    tags = commit_tags(store, [r["id"] for r in rows])
    return store, rows, tags


def test_a_commit_keeps_a_complete_output_unless_forced(tmp_path):
    store = ArtifactStore(str(tmp_path / "data"))
    rows = random_posts(10)
    first = commit_ingest(store, rows)
    # another run of the same fingerprint commits later with other bytes: the complete output stays
    work = store.begin("ingest", first.fingerprint, resume=False)
    (work / "posts.parquet").write_bytes(b"other bytes")
    kept = store.commit(IngestManifest(stage="ingest", contract_version=IngestManifest.CONTRACT_VERSION,
                                       fingerprint=first.fingerprint, config_digest="x", code_version="x",
                                       source="danbooru_api"), work)
    assert kept.file("posts.parquet").sha256 == first.file("posts.parquet").sha256
    assert verify_output(store, store.read_manifest(IngestManifest)).ok
    assert not work.exists()
    # a forced rebuild replaces it
    work = store.begin("ingest", first.fingerprint, resume=False)
    (work / "posts.parquet").write_bytes(b"forced")
    forced = store.commit(IngestManifest(stage="ingest", contract_version=IngestManifest.CONTRACT_VERSION,
                                         fingerprint=first.fingerprint, config_digest="x", code_version="x",
                                         source="danbooru_api"), work, replace=True)
    assert forced.file("posts.parquet").size == len(b"forced")


def test_a_forced_upstream_with_other_content_reruns_its_downstream(tmp_path):
    store, rows, tags = _quality_inputs(tmp_path)
    cfg = load_config({"quality": {"min_posts_per_year": 20}})
    first = run_stage(QUALITY, cfg, store)
    assert not first.cached and is_cached(QUALITY, cfg, store)

    # tag rebuilt (same fingerprint, as `fm run tag --force`) with the same rows but another report: cached
    from data_contracts.tag import TAGS_SCHEMA, TagManifest

    fields = {"model_name": "tiny", "model_identity": "0" * 64, "backend": "onnx",
              "thresholds": {"general": 0.35, "character": 0.85}}

    def recommit_tags(ids, report: bytes) -> None:
        work = store.begin("tag", tags.fingerprint, resume=False)
        from data_contracts.tables import write_table

        table = tags_table(ids)
        write_table(table, work / "tags.parquet", TAGS_SCHEMA)
        (work / "report.json").write_bytes(report)
        store.commit(TagManifest(stage="tag", contract_version=TagManifest.CONTRACT_VERSION,
                                 fingerprint=tags.fingerprint, config_digest="test", code_version="test",
                                 row_counts={"tags": table.num_rows}, **fields), work, replace=True)

    recommit_tags([r["id"] for r in rows], b'{"summary_md": "another run"}')
    assert is_cached(QUALITY, cfg, store)
    assert run_stage(QUALITY, cfg, store).cached

    # rebuilt with a row missing (a pool image was gone): quality is no longer cached and reruns on 199 rows
    recommit_tags([r["id"] for r in rows[1:]], b"{}")
    assert not is_cached(QUALITY, cfg, store)
    again = run_stage(QUALITY, cfg, store)
    assert not again.cached and again.manifest.fingerprint != first.manifest.fingerprint
    assert again.manifest.row_counts["quality"] == first.manifest.row_counts["quality"] - 1


def test_fingerprint_ignores_presentation_files_only(tmp_path):
    store = ArtifactStore(str(tmp_path / "data"))
    cfg = load_config({})
    base = commit_output(store, IngestManifest, {}, fields={"source": "danbooru_api"}, fingerprint="f" * 16,
                         files={"posts.parquet": b"a", "report.json": b"1", "visuals/x.png": b"p"})
    upstream = {"ingest": base, "tag": commit_tags(store, [1])}
    fp = compute_fingerprint(QUALITY, cfg, upstream)
    pictures = base.model_copy(deep=True)
    for entry in pictures.files:
        if entry.path != "posts.parquet":
            entry.sha256 = "0" * 64
    assert compute_fingerprint(QUALITY, cfg, {**upstream, "ingest": pictures}) == fp
    data = base.model_copy(deep=True)
    data.file("posts.parquet").sha256 = "0" * 64
    assert compute_fingerprint(QUALITY, cfg, {**upstream, "ingest": data}) != fp


# --- inspect ---------------------------------------------------------------------------------------------------

def _fm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


def test_inspect_checks_row_counts_and_unlisted_files(tmp_path):
    root = tmp_path / "data"
    store = ArtifactStore(str(root))
    rows = random_posts(12)
    manifest = commit_ingest(store, rows)
    ok = _fm("inspect", "ingest", "-o", f"data_root={root}", "--no-json")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[0].startswith(f"ingest {manifest.fingerprint}: {root}")
    assert "posts=12" in ok.stdout and "row counts match" in ok.stderr

    # the state two racing commits once left: a manifest that promises posts but lists no posts.parquet
    folder = root / "ingest" / manifest.fingerprint
    broken = json.loads((folder / "manifest.json").read_text())
    broken["files"] = []
    (folder / "manifest.json").write_text(json.dumps(broken))
    bad = _fm("inspect", "ingest", "-o", f"data_root={root}", "--no-json")
    assert bad.returncode == 1
    assert "lists no posts.parquet" in bad.stderr and "not in the manifest (e.g. posts.parquet)" in bad.stderr
    assert "fm run ingest --force" in bad.stderr

    typo = _fm("inspect", "ingset", "-o", f"data_root={root}")
    assert typo.returncode == 2 and "did you mean 'ingest'" in typo.stderr and "Traceback" not in typo.stderr
