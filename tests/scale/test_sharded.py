"""A sharded stage gives the same contract whatever runs its shards: a local Dask cluster of 2 worker
processes, Prefect's thread pool, or run_stage in this process (real flow, real Prefect API, real ONNX)."""
from __future__ import annotations

import os
import time

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


def _overrides(root, runner: str) -> list[str]:
    return [f"data_root={root / 'data'}", f"runtime.cache_dir={root / 'cache'}", "tag.shard_size=64",
            "ingest.shard_posts=128", f"runtime.task_runner={runner}", "runtime.max_workers=2",
            "train.phases=[]"]  # one bucket and cache: what these tests compare across runners


def _task_run_names(flow_run_id, expected: int, timeout_s: float = 20.0) -> list[str]:
    """Names of the flow run's task runs (task run states reach the API a moment after the flow ends)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            done = [r.name for r in runs if r.state is not None and r.state.is_completed()]
            if len(done) >= expected or time.monotonic() > deadline:
                return sorted(done)
            time.sleep(0.5)


def _tags_bytes(store: ArtifactStore) -> tuple[str, bytes]:
    manifest = store.read_manifest(TagManifest)
    return manifest.fingerprint, store.path(manifest, "tags.parquet", verify=True).read_bytes()


def test_tag_shards_on_dask_threads_and_in_process_give_the_same_bytes(tmp_path, prefect_api, monkeypatch):
    pytest.importorskip("prefect_dask", reason="the Dask runner needs prefect-dask: pip install 'booruflow[dask]'")
    from flows.fm import fm

    state = fm(config="demo", stages=["ingest", "dedup", "tag", "quality", "bucket", "cache"],
               overrides=_overrides(tmp_path, "dask"), return_state=True)
    assert state.is_completed(), state.message
    ingest, dedup, tag, _, _, cache = state.result()
    assert ingest["stage"] == "ingest" and tag["stage"] == "tag" and not tag["cached"]
    n_posts = ingest["row_counts"]["posts"]
    n_kept = dedup["row_counts"]["dedup"] - dedup["row_counts"]["rejects"]  # what tag sees
    n_shards = -(-n_kept // 64)
    assert n_shards >= 3 and len(tag["shards"]) == n_shards
    # The shards ran in the Dask worker processes, not here, and reported to this flow run.
    workers = {s["worker"] for s in tag["shards"]}
    assert all(not w.endswith(f":{os.getpid()}") for w in workers), workers
    assert 1 <= len(workers) <= 2
    # Ingest crawled here, then downloaded in shards of 128 posts on the Dask workers.
    n_ingest = len(ingest["shards"])
    assert n_ingest >= 2 and sum(s["posts"] for s in ingest["shards"]) >= n_posts
    assert all(not s["worker"].endswith(f":{os.getpid()}") for s in ingest["shards"])
    # Cache: one shard per chunk, encoded on the Dask workers, merged here.
    assert len(cache["shards"]) >= 2 and all(not s["worker"].endswith(f":{os.getpid()}") for s in cache["shards"])
    n_cache = len(cache["shards"])
    names = _task_run_names(state.state_details.flow_run_id, expected=n_shards + n_ingest + n_cache + 8)
    assert [n for n in names if n.startswith("tag-shard-")] == sorted(f"tag-shard-{i}" for i in range(n_shards))
    assert [n for n in names if n.startswith("ingest-shard-")] == sorted(f"ingest-shard-{i}" for i in range(n_ingest))
    assert "tag-merge" in names and "ingest-merge" in names and "cache-merge" in names
    assert len([n for n in names if n.startswith("cache-shard-")]) == n_cache

    cfg = load_config("demo", _overrides(tmp_path, "thread"))
    store = ArtifactStore.for_config(cfg)
    fp, on_dask = _tags_bytes(store)
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
    fp_t, on_threads = _tags_bytes(store)
    assert fp_t == fp and on_threads == on_dask

    # In process, shards in order; a picture failure must not fail the stage.
    def broken(*args, **kwargs):
        raise OSError("disk full while drawing")

    monkeypatch.setattr(tag_stage, "make_tag_sheets", broken)
    out = run_stage(tag_stage.SPEC, cfg, store, force=True)
    assert not out.cached and out.report.images == {}
    assert not any(f.path.startswith("visuals/") for f in out.manifest.files)
    fp_r, in_process = _tags_bytes(store)
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


def test_tag_shards_on_ray_give_the_same_bytes(tmp_path, prefect_api):
    """The same flow on a local Ray cluster (runs where prefect-ray is installed: pip install 'booruflow[ray]')."""
    pytest.importorskip("prefect_ray", reason="the Ray runner needs prefect-ray: pip install 'booruflow[ray]'")
    from flows.fm import fm

    state = fm(config="demo", stages=["ingest", "dedup", "tag"], overrides=_overrides(tmp_path, "ray"), return_state=True)
    assert state.is_completed(), state.message
    _, _, tag = state.result()
    assert tag["shards"] and all(not s["worker"].endswith(f":{os.getpid()}") for s in tag["shards"])
    cfg = load_config("demo", _overrides(tmp_path, "ray"))
    store = ArtifactStore.for_config(cfg)
    fp, on_ray = _tags_bytes(store)
    out = run_stage(tag_stage.SPEC, cfg, store, force=True)
    assert out.manifest.fingerprint == fp and _tags_bytes(store)[1] == on_ray


def test_ray_gives_each_gpu_shard_task_one_gpu_and_cpu_stages_none(prefect_api):
    """Ray schedules by declared resources: a local cluster declaring 2 GPUs (none needed to schedule) runs
    a cuda tag stage's (or cache's, under runtime.device cuda) shard tasks one GPU each, pinned by Ray through
    CUDA_VISIBLE_DEVICES."""
    pytest.importorskip("prefect_ray", reason="the Ray runner needs prefect-ray: pip install 'booruflow[ray]'")
    from prefect import flow, task
    from prefect_ray import RayTaskRunner

    from flows.fm import _ray_gpu_options

    @task
    def placement() -> tuple[list, str | None]:
        import ray

        return [str(g) for g in ray.get_gpu_ids()], os.environ.get("CUDA_VISIBLE_DEVICES")

    cases = [("tag", "cuda", "auto"), ("ingest", "cuda", "auto"), ("tag", "cpu", "auto"),
             ("cache", "cpu", "cuda"), ("cache", "cuda", "cpu")]

    @flow(task_runner=RayTaskRunner(init_kwargs={"num_cpus": 2, "num_gpus": 2}))
    def probe() -> list:  # one Ray cluster for every case (each start costs seconds)
        results = []
        for stage, device, runtime_device in cases:
            cfg = load_config("demo", ["runtime.task_runner=ray", f"tag.device={device}",
                                       f"runtime.device={runtime_device}"])
            with _ray_gpu_options(stage, cfg):
                futures = [placement.submit() for _ in range(4 if stage == "tag" and device == "cuda" else 2)]
            results.append([f.result() for f in futures])
        return results

    on_gpus, ingest, tag_cpu, cache_cuda, cache_cpu = probe()
    assert all(len(ids) == 1 and ids[0] in {"0", "1"} and visible == ids[0] for ids, visible in on_gpus), on_gpus
    assert all(ids == [] for ids, _ in ingest)  # not a GPU stage
    assert all(ids == [] for ids, _ in tag_cpu)  # a GPU stage on the CPU
    # Cache has no device of its own: runtime.device decides.
    assert all(len(ids) == 1 and visible == ids[0] for ids, visible in cache_cuda), cache_cuda
    assert all(ids == [] for ids, _ in cache_cpu)
