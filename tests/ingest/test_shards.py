"""Sharded ingest (the Dask/Ray path, driven here in this process): crawl first, downloads by shard, merge.

The tables equal the one-process crawl's byte for byte; a shard killed mid-way resumes with what its journal
holds (no finished file fetched again); a shard no worker ran is run by the merge; a stale post list is refused.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_contracts.errors import StageError
from data_contracts.store import ArtifactStore
from tasks.common.stage import finish_stage, plan_shards, prepare_stage
from tasks.ingest import shards
from minibooru import write_dump
from tests.ingest.test_stage import SPEC, make_cfg, run

INGEST = {"queries": [{"tags": "hanasaki_gakuen", "quota": 1000}, {"tags": "", "quota": 1000, "name": "all"}],
          "api": {"page_limit": 20, "concurrency": 3}}


def _tables(output: str) -> tuple[bytes, bytes]:
    folder = Path(output)
    return (folder / "posts.parquet").read_bytes(), (folder / "rejects.parquet").read_bytes()


def _sharded_cfg(root: Path, url: str, **ingest):
    cfg = make_cfg(root, url, **ingest)
    return cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"task_runner": "dask"})})


def _kill_mid_shard(work: Path, k: int, keep: int) -> None:
    """What a kill -9 inside shard k leaves: `keep` outcomes journalled, a torn record, no done mark."""
    _, downloads_rel, done_rel = shards._rels(k, 16)
    journal = work / downloads_rel
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:keep]) + b'{"id": 12, "md5": "ab')
    (work / done_rel).unlink()


def test_sharded_api_ingest_equals_one_process_and_resumes_a_killed_shard(minibooru, minibooru_server, tmp_path):
    ref, _ = run(make_cfg(tmp_path / "ref", minibooru_server.url, **INGEST))
    ref_posts, ref_rejects = _tables(ref.output_path)

    minibooru_server.reset_stats()
    cfg = _sharded_cfg(tmp_path / "run", minibooru_server.url, **INGEST, shard_posts=16)
    store = ArtifactStore(cfg.data_root, local_cache=cfg.runtime.cache_dir)
    prepared = prepare_stage(SPEC, cfg, store, sharded=True)
    planned = plan_shards(prepared)
    n_taken = ref.manifest.stats["per_query"][0]["taken"] + ref.manifest.stats["per_query"][1]["taken"]
    assert len(planned) == -(-n_taken // 16) >= 4
    assert minibooru_server.stats.file_hits == {}  # the plan crawls pages only: no file was fetched yet
    assert sum(s["posts"] for s in planned) == n_taken

    ctx = prepared.ctx
    first = SPEC.run_shard(ctx, planned[0])
    second = SPEC.run_shard(ctx, planned[1])
    assert first["posts"] == first["ok"] + first["failed"] == 16 and first["resumed"] == 0
    assert SPEC.run_shard(ctx, planned[0]) == first  # a done shard is not run again
    pooled = [int(json.loads(line)["id"]) for line in (ctx.work / shards._rels(1, 16)[1]).read_text().splitlines()
              if json.loads(line)["ok"]]
    _kill_mid_shard(ctx.work, 1, keep=5)
    hits_before = dict(minibooru_server.stats.file_hits)

    # The rerun plans the killed shard again with the rest, and crawls no page twice.
    pages_before = len(minibooru_server.stats.api_queries)
    replanned = plan_shards(prepare_stage(SPEC, cfg, store, sharded=True))
    assert len(minibooru_server.stats.api_queries) == pages_before
    assert [s["index"] for s in replanned] == [s["index"] for s in planned[1:]]
    resumed = SPEC.run_shard(ctx, replanned[0])
    assert resumed["resumed"] == 5 and resumed["ok"] + resumed["failed"] == 16
    assert resumed["ok"] == second["ok"]
    # Shards 2.. were never run by a worker: the merge runs them. Only shard 0's summary reaches it.
    outcome = finish_stage(prepared, [first])
    assert outcome.manifest.fingerprint == ref.manifest.fingerprint
    assert _tables(outcome.output_path) == (ref_posts, ref_rejects)
    run_stats = outcome.manifest.stats["run"]
    assert run_stats["shards"]["count"] == len(planned)
    assert run_stats["downloads"]["fetched"] >= n_taken - 16
    # No file that was in the pool when shard 1 was killed was fetched again (failed ones past the 5 kept
    # outcomes are: their outcome was lost with the kill); shards 2.. fetched each file once.
    hits = minibooru_server.stats.file_hits
    assert pooled and all(hits[pid] == hits_before[pid] == 1 for pid in pooled)
    assert not any((Path(cfg.data_root) / "ingest" / "_work").glob("*/journal"))


def test_sharded_dump_import_equals_one_process(minibooru, tmp_path):
    dump = write_dump(minibooru.root, tmp_path / "dump", fmt="jsonl", images="tar", shard_size=16)
    tree = {"source": "danbooru_dump", "dump": {"posts_path": str(dump)}, "queries": INGEST["queries"]}
    ref, _ = run(make_cfg(tmp_path / "ref", "embedded:minibooru", **tree))
    cfg = _sharded_cfg(tmp_path / "run", "embedded:minibooru", **tree, shard_posts=16)
    store = ArtifactStore(cfg.data_root, local_cache=cfg.runtime.cache_dir)
    prepared = prepare_stage(SPEC, cfg, store, sharded=True)
    planned = plan_shards(prepared)
    assert len(planned) >= 2
    assert not any((Path(cfg.data_root) / "pool").rglob("*.jpg"))  # metadata first, files by shard
    results = [SPEC.run_shard(prepared.ctx, s) for s in planned]
    assert all(r["run"]["dump"]["imported"] + r["failed"] > 0 for r in results)
    outcome = finish_stage(prepared, results)
    assert _tables(outcome.output_path) == _tables(ref.output_path)


def test_a_shard_planned_on_another_crawl_is_refused(minibooru_server, tmp_path):
    cfg = _sharded_cfg(tmp_path, minibooru_server.url, **INGEST, shard_posts=16)
    store = ArtifactStore(cfg.data_root, local_cache=cfg.runtime.cache_dir)
    prepared = prepare_stage(SPEC, cfg, store, sharded=True)
    planned = plan_shards(prepared)
    with pytest.raises(StageError, match="does not match the crawl"):
        SPEC.run_shard(prepared.ctx, {**planned[0], "first_id": planned[0]["first_id"] + 10**6})
    posts_rel, _, _ = shards._rels(planned[1]["index"], 16)
    (prepared.ctx.work / posts_rel).unlink()
    with pytest.raises(StageError, match="post list .* is missing"):
        SPEC.run_shard(prepared.ctx, planned[1])
    assert json.loads((prepared.ctx.work / shards.CRAWL_STATS).read_text())["http"]["requests"] > 0


def test_a_resume_with_other_shards_or_a_cut_journal_loses_no_post(minibooru_server, tmp_path):
    """A done mark counts only for the very posts it names, and only with an outcome for each in its journal:
    a resume with another ingest.shard_posts, or a journal that lost its tail (power loss) under an intact
    mark, runs those posts again instead of writing them off as not_downloaded."""
    ref, _ = run(make_cfg(tmp_path / "ref", minibooru_server.url, **INGEST))
    cfg = _sharded_cfg(tmp_path / "run", minibooru_server.url, **INGEST, shard_posts=16)
    store = ArtifactStore(cfg.data_root, local_cache=cfg.runtime.cache_dir)
    prepared = prepare_stage(SPEC, cfg, store, sharded=True)
    planned = plan_shards(prepared)
    SPEC.run_shard(prepared.ctx, planned[0])
    SPEC.run_shard(prepared.ctx, planned[1])
    journal = prepared.ctx.work / shards._rels(1, 16)[1]
    journal.write_bytes(b"".join(journal.read_bytes().splitlines(keepends=True)[:4]))  # the mark survives
    assert [s["index"] for s in plan_shards(prepare_stage(SPEC, cfg, store, sharded=True))][:1] == [1]

    wider = _sharded_cfg(tmp_path / "run", minibooru_server.url, **INGEST, shard_posts=32)
    prepared = prepare_stage(SPEC, wider, store, sharded=True)
    replanned = plan_shards(prepared)
    assert replanned[0]["index"] == 0 and replanned[0]["posts"] == 32  # shard-16-0's mark does not count
    done = SPEC.run_shard(prepared.ctx, replanned[0])
    # The old shards had pooled every good file of these 32 posts: none is fetched again.
    assert done["resumed"] == 0 and done["run"]["downloads"]["cached"] == done["ok"] > 0
    out = finish_stage(prepared, [done])
    assert _tables(out.output_path) == _tables(ref.output_path)


SHARD_CHILD = """
import json, sys
from data_contracts.store import ArtifactStore
from pipeline_config.load import load_config
from tasks.common.stage import reopen_stage
from tasks.ingest.stage import SPEC
cfg = load_config(json.loads(sys.argv[1]))
store = ArtifactStore(cfg.data_root, local_cache=cfg.runtime.cache_dir)
ctx = reopen_stage(SPEC, cfg, store, sys.argv[2], sharded=True).ctx
print(json.dumps(SPEC.run_shard(ctx, json.loads(sys.argv[3]))), flush=True)
"""


def test_kill_9_of_a_worker_mid_shard_then_the_retry_finishes_it(minibooru, minibooru_server, tmp_path):
    """A real worker process killed while its shard downloads (slowed server): the retry fetches only what
    the kill left unfinished, and the merged tables equal the one-process crawl's."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.ingest.test_resume import REPO, _pool_images

    ref, _ = run(make_cfg(tmp_path / "ref", minibooru_server.url, **INGEST))
    cfg = _sharded_cfg(tmp_path / "run", minibooru_server.url, **INGEST, shard_posts=40)
    cfg = cfg.model_copy(update={"ingest": cfg.ingest.model_copy(update={"verify": cfg.ingest.verify.model_copy(
        update={"mode": "process"})})})
    store = ArtifactStore(cfg.data_root, local_cache=cfg.runtime.cache_dir)
    prepared = prepare_stage(SPEC, cfg, store, sharded=True)
    planned = plan_shards(prepared)
    minibooru_server.reset_stats()
    minibooru_server.faults.slow_ids = {r["id"] for r in minibooru.load_posts()}
    minibooru_server.faults.delay_s = 0.08
    root = Path(cfg.data_root)

    def start():
        return subprocess.Popen([sys.executable, "-c", SHARD_CHILD, cfg.model_dump_json(), prepared.ctx.fingerprint,
                                 json.dumps(planned[0])], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    proc = start()
    deadline = time.monotonic() + 60
    while len(_pool_images(root)) < 10:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the shard did not get to its downloads"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    pooled_at_kill = {p.split("/")[-1].split(".")[0] for p in _pool_images(root)}
    hits_at_kill = dict(minibooru_server.stats.file_hits)
    assert 10 <= len(pooled_at_kill) < planned[0]["posts"]

    proc = start()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    summary = json.loads(out.decode().strip().splitlines()[-1])
    # Outcomes journalled before the kill are kept; files pooled in flight (not yet journalled) are not refetched.
    assert summary["ok"] + summary["failed"] == planned[0]["posts"]
    assert summary["resumed"] >= 10 - cfg.ingest.api.concurrency
    id_of = {r["md5"]: r["id"] for r in minibooru.load_posts() if r.get("md5")}
    hits = minibooru_server.stats.file_hits
    assert all(hits[id_of[md5]] == hits_at_kill[id_of[md5]] for md5 in pooled_at_kill)  # none fetched again
    minibooru_server.faults.slow_ids = set()
    out_stage = finish_stage(prepared, [summary])
    assert _tables(out_stage.output_path) == _tables(ref.output_path)
