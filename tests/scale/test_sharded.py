"""A sharded stage gives the same contract whatever runs its shards: a local Dask cluster of 2 worker
processes, Prefect's thread pool, or run_stage in this process (real flow, real Prefect API, real ONNX).

The Dask cluster is the one the flow's runner would start (`make_task_runner`'s LocalCluster arguments:
2 single-threaded worker processes that report to this process's Prefect API), started once and given to
the flow as `runtime.runner_address`: its workers import torch, the tagger and the VAE once for ingest, tag
and cache instead of once per stage (10-25 s of CPU per worker process and stage on this 2-core machine)."""
from __future__ import annotations

import os

import pytest

from data_contracts.cache import CacheManifest
from data_contracts.ingest import IngestManifest
from data_contracts.store import ArtifactStore
from data_contracts.tag import TagManifest
from pipeline_config.load import load_config
from tasks.cache import stage as cache_stage
from tasks.common.stage import (
    finish_stage,
    plan_shards,
    prepare_stage,
    reopen_stage,
    run_stage,
)
from tasks.ingest import stage as ingest_stage
from tasks.registry import stage_spec
from tasks.tag import stage as tag_stage
from tests.scale.sharded_helpers import TAG_SHARD, tags_bytes, task_run_names
from tests.scale.sharded_helpers import overrides as _overrides


@pytest.fixture(scope="module")
def dask_address(prefect_api):
    """The scheduler address of a local Dask cluster started with the flow's own runner arguments."""
    pytest.importorskip("prefect_dask", reason="the Dask runner needs prefect-dask: pip install 'booruflow[dask]'")
    from distributed import LocalCluster

    from flows.fm import make_task_runner

    runner = make_task_runner(load_config("demo", ["runtime.task_runner=dask", "runtime.max_workers=2"]))
    kwargs = runner.cluster_kwargs
    assert runner.cluster_class is None  # prefect-dask starts a distributed.LocalCluster(**cluster_kwargs)
    assert kwargs["n_workers"] == 2 and kwargs["threads_per_worker"] == 1 and kwargs["processes"] is True
    assert kwargs["env"]["PREFECT_API_URL"].startswith("http://")  # the workers report to this flow's API
    with LocalCluster(**kwargs) as cluster:
        yield cluster.scheduler_address


def test_tag_shards_on_dask_threads_and_in_process_give_the_same_bytes(tmp_path, prefect_api, dask_address,
                                                                       monkeypatch):
    from flows.fm import fm

    state = fm(config="demo", stages=["ingest", "dedup", "tag", "quality", "bucket", "cache"],
               overrides=_overrides(tmp_path, "dask", f"runtime.runner_address={dask_address}"), return_state=True)
    assert state.is_completed(), state.message
    ingest, dedup, tag, _, _, cache = state.result()
    assert ingest["stage"] == "ingest" and tag["stage"] == "tag" and not tag["cached"]
    n_posts = ingest["row_counts"]["posts"]
    n_kept = dedup["row_counts"]["dedup"] - dedup["row_counts"]["rejects"]  # what tag sees
    n_shards = -(-n_kept // TAG_SHARD)
    assert n_shards >= 3 and len(tag["shards"]) == n_shards
    # The shards ran in the Dask worker processes, not here, and reported to this flow run.
    workers = {s["worker"] for s in tag["shards"]}
    assert all(not w.endswith(f":{os.getpid()}") for w in workers), workers
    assert 1 <= len(workers) <= 2
    # Ingest crawled here, then downloaded in shards (ingest.shard_posts) on the Dask workers.
    n_ingest = len(ingest["shards"])
    assert n_ingest >= 2 and sum(s["posts"] for s in ingest["shards"]) >= n_posts
    assert all(not s["worker"].endswith(f":{os.getpid()}") for s in ingest["shards"])
    # Cache: one shard per chunk, encoded on the Dask workers, merged here.
    assert len(cache["shards"]) >= 2 and all(not s["worker"].endswith(f":{os.getpid()}") for s in cache["shards"])
    n_cache = len(cache["shards"])
    names = task_run_names(state.state_details.flow_run_id, expected=n_shards + n_ingest + n_cache + 8)
    assert [n for n in names if n.startswith("tag-shard-")] == sorted(f"tag-shard-{i}" for i in range(n_shards))
    assert [n for n in names if n.startswith("ingest-shard-")] == sorted(f"ingest-shard-{i}" for i in range(n_ingest))
    assert "tag-merge" in names and "ingest-merge" in names and "cache-merge" in names
    assert len([n for n in names if n.startswith("cache-shard-")]) == n_cache

    cfg = load_config("demo", _overrides(tmp_path, "thread"))
    store = ArtifactStore.for_config(cfg)
    fp, on_dask = tags_bytes(store)
    manifest = store.read_manifest(TagManifest)
    assert manifest.row_counts["tags"] + manifest.row_counts["rejects"] == n_kept
    assert {"visuals/tag-added.png"} <= {f.path for f in manifest.files}  # report pictures committed

    ingest_manifest = store.read_manifest(IngestManifest)
    ingest_tables = [store.path(ingest_manifest, name, verify=True).read_bytes()
                     for name in ("posts.parquet", "rejects.parquet")]

    # Threads (same flow, rebuilt with force: the runner is not part of the fingerprint). Ingest is one
    # task there (crawl and downloads pipelined) and writes the same tables.
    state = fm(config="demo", stages=["ingest", "dedup", "tag"], overrides=_overrides(tmp_path, "thread"), force=True,
               return_state=True)
    assert state.is_completed(), state.message
    ingest_t, _, tag_t = state.result()
    assert ingest_t["fingerprint"] == ingest_manifest.fingerprint and ingest_t["shards"] == []
    assert [store.path(ingest_manifest, name, verify=True).read_bytes()
            for name in ("posts.parquet", "rejects.parquet")] == ingest_tables
    assert all(s["worker"].endswith(f":{os.getpid()}") for s in tag_t["shards"])  # threads of this process
    fp_t, on_threads = tags_bytes(store)
    assert fp_t == fp and on_threads == on_dask

    # In process, shards in order; a picture failure must not fail the stage.
    def broken(*args, **kwargs):
        raise OSError("disk full while drawing")

    monkeypatch.setattr(tag_stage, "make_tag_sheets", broken)
    out = run_stage(tag_stage.SPEC, cfg, store, force=True)
    assert not out.cached and out.report.images == {}
    assert not any(f.path.startswith("visuals/") for f in out.manifest.files)
    fp_r, in_process = tags_bytes(store)
    assert fp_r == fp and in_process == on_dask

    # Cache in this process (one task, no shards) writes the chunks the Dask workers wrote.
    cache_manifest = store.read_manifest(CacheManifest)
    on_dask_chunks = {c.path: c.sha256 for c in cache_manifest.chunks}
    again = run_stage(cache_stage.SPEC, cfg, store, force=True).manifest
    assert again.fingerprint == cache_manifest.fingerprint
    assert {c.path: c.sha256 for c in again.chunks} == on_dask_chunks and len(on_dask_chunks) == n_cache


def test_killed_merge_resumes_from_shards_published_by_workers(tmp_path):
    """run_shard is the unit a worker runs; build merges whatever is journaled and runs what is missing."""
    cfg = load_config("demo", [f"data_root={tmp_path / 'data'}", f"runtime.cache_dir={tmp_path / 'cache'}",
                               "tag.shard_size=100", "ingest.embedded.posts=160"])
    store = ArtifactStore.for_config(cfg)

    run_stage(ingest_stage.SPEC, cfg, store)
    run_stage(stage_spec("dedup"), cfg, store)
    prepared = prepare_stage(tag_stage.SPEC, cfg, store)
    shards = plan_shards(prepared)
    assert [s["index"] for s in shards] == list(range(len(shards))) and len(shards) >= 2
    # "Another worker" runs shard 1 only, through its own reopened context.
    other = reopen_stage(tag_stage.SPEC, cfg, store, prepared.ctx.fingerprint)
    first = tag_stage.run_shard(other.ctx, shards[1])
    assert tag_stage.run_shard(other.ctx, shards[1]) == first  # idempotent: a retry returns the journal
    assert [s["index"] for s in plan_shards(prepare_stage(tag_stage.SPEC, cfg, store))] == [0] + list(
        range(2, len(shards)))
    # The merge runs the shards nobody ran; the result equals a clean in-process run.
    out = finish_stage(reopen_stage(tag_stage.SPEC, cfg, store, prepared.ctx.fingerprint), [first])
    merged = store.path(out.manifest, "tags.parquet").read_bytes()
    again = run_stage(tag_stage.SPEC, cfg, store, force=True)
    assert store.path(again.manifest, "tags.parquet").read_bytes() == merged
