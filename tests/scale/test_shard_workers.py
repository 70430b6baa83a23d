"""Shards spread over worker processes (one per GPU; on this CPU-only machine, N CPU processes run the same
code): same bytes as in-process, shards claimed dynamically (a late starter takes fewer), a worker failure
is a clear error and a rerun resumes."""
from __future__ import annotations

import logging
import os
import threading

import pytest

from data_contracts.errors import ConfigError, StageError
from data_contracts.store import ArtifactStore
from data_contracts.tag import TagManifest
from pipeline_config.load import load_config, section_dict
from tasks.common import shard_workers, workers
from tasks.common.shard_workers import (
    WorkerSlot,
    claim,
    plan_slots,
    run_in_workers,
    worker_env,
)
from tasks.common.stage import (
    finish_stage,
    plan_shards,
    prepare_stage,
    run_stage,
    worker_slots,
)
from tasks.ingest import stage as ingest_stage
from tasks.registry import stage_spec
from tasks.tag import stage as tag_stage

# 64 posts: 43 pass the demo's filters (dedup off: tag sees all 43), 4 tag shards of 11. Each test starts
# tagger processes of its own (seconds each); the mini-booru is only what gets the shards planned.
SMALL = ["ingest.embedded.posts=64", "tag.shard_size=11", "dedup.enabled=false"]


def _cfg(root, *extra: str):
    return load_config("demo", [f"data_root={root / 'data'}", f"runtime.cache_dir={root / 'cache'}", *SMALL, *extra])


def _tags(store: ArtifactStore) -> tuple[str, bytes]:
    manifest = store.read_manifest(TagManifest)
    return manifest.fingerprint, store.path(manifest, "tags.parquet", verify=True).read_bytes()


def test_claims_and_slot_planning(tmp_path, monkeypatch):
    assert claim(tmp_path, 3) and not claim(tmp_path, 3) and claim(tmp_path, 4)  # each shard goes to one taker
    assert shard_workers.claim_owners(tmp_path, [3, 4]) == {os.getpid()}  # the taker is on file
    assert shard_workers.claim_owners(tmp_path, [3, 4, 5]) is None  # shard 5 is still free
    (tmp_path / "shard-00006").touch()  # created, taker not yet written: not known to be taken by anyone
    assert shard_workers.claim_owners(tmp_path, [3, 6]) is None
    assert plan_slots(0, "cpu", 5) == [WorkerSlot("cpu")]
    assert plan_slots(3, "cpu", 2) == [WorkerSlot("cpu")] * 2  # never more workers than shards
    monkeypatch.setattr(shard_workers, "visible_gpu_ids", lambda: ["2", "5"])
    assert plan_slots(0, "cuda", 10) == [WorkerSlot("2"), WorkerSlot("5")]  # every visible GPU
    assert plan_slots(1, "cuda", 10) == [WorkerSlot("2")]
    with pytest.raises(ConfigError, match="only 2 GPU"):
        plan_slots(3, "cuda", 10)
    # A worker sees only its own GPU (and none at all on the CPU).
    assert worker_env(WorkerSlot("5"), {"CUDA_VISIBLE_DEVICES": "2,5"})["CUDA_VISIBLE_DEVICES"] == "5"
    assert worker_env(WorkerSlot("cpu"), {})["CUDA_VISIBLE_DEVICES"] == ""


def test_visible_gpu_ids_follow_cuda_visible_devices(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert shard_workers.visible_gpu_ids() == ["3", "1"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert shard_workers.visible_gpu_ids() == ["0", "1"]


def test_tag_in_two_worker_processes_equals_in_process(tmp_path):
    cfg = _cfg(tmp_path)
    store = ArtifactStore.for_config(cfg)
    run_stage(ingest_stage.SPEC, cfg, store)
    run_stage(stage_spec("dedup"), cfg, store)
    run_stage(tag_stage.SPEC, cfg, store)
    fp, in_process = _tags(store)

    # tag.processes is how it runs, not what it writes: same fingerprint, forced rebuild in 2 processes.
    cfg2 = _cfg(tmp_path, "tag.processes=2")
    assert section_dict(cfg2, "tag") == section_dict(cfg, "tag")
    prepared = prepare_stage(tag_stage.SPEC, cfg2, store, force=True)
    shards = plan_shards(prepared)
    assert len(shards) == 4
    slots = worker_slots(prepared, len(shards))
    assert slots == [WorkerSlot("cpu"), WorkerSlot("cpu")]

    # This process takes part (its model is loaded) beside one worker; it holds its first shard until the
    # worker has finished one, so both provably share the plan (claims are dynamic).
    worker_done = threading.Event()
    seen: list[dict] = []

    def on_shard(summary: dict) -> None:
        seen.append(summary)
        if not summary["worker"].endswith(f":{os.getpid()}"):
            worker_done.set()

    def local(shard: dict) -> dict:
        assert worker_done.wait(120), "the worker never finished a shard"
        return tag_stage.run_shard(prepared.ctx, shard)

    results = run_in_workers("tag", cfg2.model_dump(mode="json"), fp, shards, slots[1:],
                             log=logging.getLogger("test"), on_shard=on_shard, local=local)
    assert [r["index"] for r in results] == [0, 1, 2, 3] and len(seen) == 4
    pids = {r["worker"].rsplit(":", 1)[1] for r in results}
    assert len(pids) == 2 and str(os.getpid()) in pids  # this process and the worker
    assert results[0]["worker"].endswith(f":{os.getpid()}")  # claimed first, by the one that starts at once
    out2 = finish_stage(prepared, results)
    assert out2.manifest.fingerprint == fp
    assert store.path(out2.manifest, "tags.parquet").read_bytes() == in_process

    # Two workers and no local part: every shard comes back, none from this process.
    prepared = prepare_stage(tag_stage.SPEC, cfg2, store, force=True)
    results = run_in_workers("tag", cfg2.model_dump(mode="json"), fp, plan_shards(prepared), slots,
                             log=logging.getLogger("test"))
    assert [r["index"] for r in results] == [0, 1, 2, 3]
    assert not any(r["worker"].endswith(f":{os.getpid()}") for r in results)
    assert store.path(finish_stage(prepared, results).manifest, "tags.parquet").read_bytes() == in_process

    # run_stage takes the same path by itself.
    out3 = run_stage(tag_stage.SPEC, cfg2, store, force=True)
    assert store.path(out3.manifest, "tags.parquet").read_bytes() == in_process


def test_worker_failure_is_a_clear_error_and_the_rerun_resumes(tmp_path):
    cfg = _cfg(tmp_path, "tag.processes=2")
    store = ArtifactStore.for_config(cfg)
    run_stage(ingest_stage.SPEC, cfg, store)
    n_posts = run_stage(stage_spec("dedup"), cfg, store).manifest.stats["kept"]  # what tag sees
    prepared = prepare_stage(tag_stage.SPEC, cfg, store)
    shards = plan_shards(prepared)
    # A worker given the wrong fingerprint refuses with the stage's own message, named by its device.
    with pytest.raises(StageError, match=r"tag worker on cpu: .*fingerprint"):
        run_in_workers("tag", cfg.model_dump(mode="json"), "0" * 16, shards[:2], [WorkerSlot("cpu")] * 2,
                       log=logging.getLogger("test"))
    # One worker runs shard 1 and is done; the stage then runs only the remaining shards.
    run_in_workers("tag", cfg.model_dump(mode="json"), prepared.ctx.fingerprint, [shards[1]], [WorkerSlot("cpu")],
                   log=logging.getLogger("test"))
    left = plan_shards(prepare_stage(tag_stage.SPEC, cfg, store))
    assert [s["index"] for s in left] == [0, 2, 3]
    out = run_stage(tag_stage.SPEC, cfg, store)
    assert out.manifest.row_counts["tags"] + out.manifest.row_counts["rejects"] == n_posts


def test_flow_runs_one_task_per_device_worker(tmp_path, prefect_api):
    from flows.fm import fm
    from tests.scale.sharded_helpers import task_run_names

    overrides = [f"data_root={tmp_path / 'data'}", f"runtime.cache_dir={tmp_path / 'cache'}", *SMALL, "tag.processes=2"]
    state = fm(config="demo", stages=["ingest", "dedup", "tag"], overrides=overrides, return_state=True)
    assert state.is_completed(), state.message
    _, _, tag = state.result()
    assert len(tag["shards"]) == 4 and [s["index"] for s in tag["shards"]] == [0, 1, 2, 3]
    assert 1 <= len({s["worker"] for s in tag["shards"]}) <= 2  # the flow's own process and/or one worker
    names = task_run_names(state.state_details.flow_run_id, expected=5)
    assert {"tag-cpu-0", "tag-cpu-1", "tag-merge"} <= set(names), names
    assert not any(n.startswith("tag-shard-") for n in names)


def test_a_worker_still_starting_when_every_shard_is_taken_is_stopped(tmp_path, monkeypatch):
    """This process takes every shard while the worker is still starting (its interpreter start made
    120 s slow by a sitecustomize): the call returns at once, with no error and no process left."""
    import subprocess
    import time

    cfg = _cfg(tmp_path, "tag.processes=2")
    store = ArtifactStore.for_config(cfg)
    run_stage(ingest_stage.SPEC, cfg, store)
    run_stage(stage_spec("dedup"), cfg, store)
    prepared = prepare_stage(tag_stage.SPEC, cfg, store)
    shards = plan_shards(prepared)
    slow = tmp_path / "slow-start"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text("import time\ntime.sleep(120)\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(slow), os.environ.get("PYTHONPATH", "")]))
    popen = subprocess.Popen
    started: list = []

    def tracked(*args, **kwargs):
        started.append(popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(workers.subprocess, "Popen", tracked)
    t0 = time.monotonic()
    results = run_in_workers("tag", cfg.model_dump(mode="json"), prepared.ctx.fingerprint, shards,
                             [WorkerSlot("cpu")], log=logging.getLogger("test"),
                             local=lambda shard: tag_stage.run_shard(prepared.ctx, shard))
    assert time.monotonic() - t0 < 60
    assert [r["index"] for r in results] == [s["index"] for s in shards]
    assert all(r["worker"].endswith(f":{os.getpid()}") for r in results)
    assert len(started) == 1 and started[0].poll() is not None  # stopped, not left behind
