"""The house's one journal format: torn lines after kill -9, readers beside a writer, shard done marks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

from data_contracts.store import ArtifactStore
from tasks.cache.chunks import append_journal
from tasks.common.journal import Journal, publish_done, read_done_mark, read_records, write_done_mark


def test_a_torn_last_line_is_cut_on_open_and_the_next_record_starts_clean(tmp_path):
    path = tmp_path / "j.jsonl"
    with Journal(path) as journal:
        journal.append({"id": 1, "ok": True})
        journal.append({"id": 2, "ok": False}, sync=True)
    with open(path, "ab") as fh:
        fh.write(b'{"id": 3, "o')  # a kill in the middle of a write
    assert [r["id"] for r in read_records(path)] == [1, 2]  # a reader stops before the torn line
    with Journal(path) as journal:
        journal.append({"id": 4, "ok": True})
        assert [r["id"] for r in journal.records()] == [1, 2, 4]
    assert path.read_bytes().count(b"\n") == 3


def test_records_survive_kill_9_of_the_writer(tmp_path):
    path = tmp_path / "j.jsonl"
    code = ("import sys, os, signal\n"
            "from pathlib import Path\n"
            "from tasks.common.journal import Journal\n"
            "j = Journal(Path(sys.argv[1]))\n"
            "for i in range(50):\n"
            "    j.append({'id': i})\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], cwd=os.getcwd())
    assert proc.returncode == -9
    assert [r["id"] for r in read_records(path)] == list(range(50))  # flushed per record: nothing lost


def test_reading_a_journal_that_does_not_exist_yet_gives_nothing(tmp_path):
    assert list(read_records(tmp_path / "none.jsonl")) == []


def test_a_cache_chunk_record_appended_after_a_kill_is_kept(tmp_path):
    # Before the journal was shared, a record appended after a torn line fused with it and was lost.
    path = tmp_path / "_journal-0.jsonl"
    append_journal(path, {"path": "a", "rows": 0})
    with open(path, "ab") as fh:
        fh.write(b'{"path": "b", "ro')
    append_journal(path, {"path": "c", "rows": 0})
    assert [r["path"] for r in read_records(path)] == ["a", "c"]


def _ctx(root):
    store = ArtifactStore(str(root))
    work = store.work_dir("tag", "f" * 16)
    work.mkdir(parents=True)
    return SimpleNamespace(store=store, stage="tag", fingerprint="f" * 16, work=work)


def test_a_done_mark_counts_only_with_every_file_of_its_shard(tmp_path):
    ctx = _ctx(tmp_path / "root")
    (ctx.work / "journal").mkdir()
    (ctx.work / "journal/shard-0.tags.parquet").write_bytes(b"x")
    write_done_mark(ctx, "journal/shard-0.done.json", {"index": 0, "tagged": 5}, ["journal/shard-0.tags.parquet"])
    assert json.loads((ctx.work / "journal/shard-0.done.json").read_text()) == {"index": 0, "tagged": 5}
    files = ["journal/shard-0.tags.parquet", "journal/shard-0.rejects.parquet"]
    assert read_done_mark(ctx, "journal/shard-0.done.json", files) is None  # its rejects table is missing
    (ctx.work / "journal/shard-0.rejects.parquet").write_bytes(b"y")
    assert read_done_mark(ctx, "journal/shard-0.done.json", files) == {"index": 0, "tagged": 5}
    assert read_done_mark(ctx, "journal/shard-1.done.json", []) is None
    publish_done(ctx, "journal/shard-0.done.json", files)  # a local store: publishing is a no-op that must not fail
