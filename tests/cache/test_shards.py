"""Sharded cache (the Dask/Ray path, driven here in this process): one chunk plan per shard, then the merge.

The same chunks and rejects as the one-process stage, byte for byte; a chunk lost to a kill is planned again;
a shard no worker ran is written by the merge; a shard planned on other samples is refused.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_contracts.errors import StageError
from data_contracts.store import ArtifactStore
from tasks.cache import shards
from tasks.cache.stage import SPEC
from tasks.common.stage import finish_stage, plan_shards, prepare_stage, run_stage
from tests.cache.data import cache_config, make_upstream


def _output(store: ArtifactStore, manifest) -> dict[str, bytes]:
    folder = Path(store.output_path("cache", manifest.fingerprint))
    files = [c.path for c in manifest.chunks]
    return {rel: (folder / rel).read_bytes() for rel in files}


def test_sharded_cache_writes_the_same_chunks_resumes_and_merges_unrun_shards(tmp_path, model_cache):
    ref_store = ArtifactStore(str(tmp_path / "ref"))
    up = make_upstream(ref_store, n=16)
    ref = run_stage(SPEC, cache_config(tmp_path / "ref", model_cache), ref_store).manifest

    store = ArtifactStore(str(tmp_path / "run"))
    make_upstream(store, n=16)
    # Sharded as the flow does under Dask/Ray: the context says so, whatever runner the config names.
    cfg = cache_config(tmp_path / "run", model_cache)
    assert cfg.runtime.task_runner == "thread"
    assert plan_shards(prepare_stage(SPEC, cfg, store)) == []  # not sharded: the stage is one task
    prepared = prepare_stage(SPEC, cfg, store, sharded=True)
    planned = plan_shards(prepared)
    assert len(planned) >= 4
    assert [s["rows"] for s in planned] == sorted((s["rows"] for s in planned), reverse=True)  # largest first
    assert (prepared.ctx.work / shards.SAMPLES).exists()

    ctx = prepared.ctx
    first, second = (SPEC.run_shard(ctx, s) for s in planned[:2])
    assert first["images"] > 0 and SPEC.run_shard(ctx, planned[0])["images"] == 0  # done: not encoded again
    # A kill after shard 1's chunk was renamed but before its journal line: the chunk is written again.
    (ctx.work / shards._journal_rel(planned[1]["index"])).write_text("")
    replanned = plan_shards(prepare_stage(SPEC, cfg, store, sharded=True))
    assert [s["index"] for s in replanned] == [s["index"] for s in planned[1:]]
    # Refused: a shard whose chunk does not match the samples it claims.
    with pytest.raises(StageError, match="does not match the samples"):
        SPEC.run_shard(ctx, {**planned[2], "key": "0" * 16})
    SPEC.run_shard(ctx, replanned[0])

    # Shards 2.. never ran on a worker: the merge writes them.
    out = finish_stage(prepared, [first, second])
    assert out.manifest.fingerprint == ref.fingerprint  # the runner is not part of the fingerprint
    assert _output(store, out.manifest) == _output(ref_store, ref)  # every chunk, byte for byte
    rows = lambda s, m, root: [{**r, "detail": r["detail"].replace(str(root), "<root>")}  # noqa: E731
                               for r in pq.read_table(s.path(m, "rejects.parquet")).to_pylist()]
    assert rows(store, out.manifest, tmp_path / "run") == rows(ref_store, ref, tmp_path / "ref")
    assert out.manifest.row_counts == ref.row_counts
    assert sorted(pq.read_table(store.path(out.manifest, "rejects.parquet")).column("id").to_pylist()) == sorted(
        up.rejects)
    assert not (Path(store.output_path("cache", out.manifest.fingerprint)) / shards.SAMPLES).exists()
    assert out.manifest.stats["images_this_run"] > 0
