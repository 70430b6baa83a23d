"""The sharded flow on Ray (runs where prefect-ray is installed: pip install 'booruflow[ray]'): the same bytes
as in this process, and shard tasks placed by their declared resources.

A Ray start costs seconds of CPU (raylet, GCS, dashboard, workers importing the project), so this module
starts one local Ray instance with the very `ray.init` arguments the flow's runner gives (`make_task_runner`),
plus 2 declared GPUs for the placement test; every RayTaskRunner here finds it initialized and uses it, as it
would use any running local instance. (Its own file, so that xdist can run it beside the Dask test in
test_sharded.py.)"""
from __future__ import annotations

import os

import pytest

from data_contracts.store import ArtifactStore
from pipeline_config.load import load_config
from tasks.common.stage import run_stage
from tasks.tag import stage as tag_stage
from tests.scale.sharded_helpers import overrides, tags_bytes, task_run_names


@pytest.fixture(scope="module")
def ray_instance(prefect_api):
    """(init kwargs of the flow's Ray runner) while one local Ray instance runs, started with them."""
    pytest.importorskip("prefect_ray", reason="the Ray runner needs prefect-ray: pip install 'booruflow[ray]'")
    import ray

    from flows.fm import make_task_runner

    runner = make_task_runner(load_config("demo", ["runtime.task_runner=ray", "runtime.max_workers=2"]))
    init = dict(runner.init_kwargs)
    # what the workers need to report to this module's Prefect API reaches them through the job's runtime env
    assert init["num_cpus"] == 2 and init["runtime_env"]["env_vars"]["PREFECT_API_URL"].startswith("http://")
    assert not ray.is_initialized()
    ray.init(**init, num_gpus=2, include_dashboard=False)  # no dashboard: nothing here reads it
    try:
        yield init
    finally:
        ray.shutdown()


def test_tag_shards_on_ray_give_the_same_bytes(tmp_path, prefect_api, ray_instance):
    from flows.fm import fm, make_task_runner

    cfg = load_config("demo", overrides(tmp_path, "ray"))
    assert make_task_runner(cfg).init_kwargs == ray_instance  # the flow's runner asks for the running instance
    state = fm(config="demo", stages=["ingest", "dedup", "tag"], overrides=overrides(tmp_path, "ray"),
               return_state=True)
    assert state.is_completed(), state.message
    ingest, _, tag = state.result()
    assert tag["shards"] and all(not s["worker"].endswith(f":{os.getpid()}") for s in tag["shards"])
    # the Ray workers reported their shard task runs to this flow run (PREFECT_API_URL reached them)
    n, n_ingest = len(tag["shards"]), len(ingest["shards"])
    names = task_run_names(state.state_details.flow_run_id, expected=n + n_ingest + 5)
    assert [x for x in names if x.startswith("tag-shard-")] == sorted(f"tag-shard-{i}" for i in range(n))

    store = ArtifactStore.for_config(cfg)
    fp, on_ray = tags_bytes(store)
    out = run_stage(tag_stage.SPEC, cfg, store, force=True)
    assert out.manifest.fingerprint == fp and tags_bytes(store)[1] == on_ray


def test_ray_gives_each_gpu_shard_task_one_gpu_and_cpu_stages_none(prefect_api, ray_instance):
    """Ray schedules by declared resources: a local instance declaring 2 GPUs (none needed to schedule) runs
    a cuda tag stage's (or cache's, under runtime.device cuda) shard tasks one GPU each, pinned by Ray through
    CUDA_VISIBLE_DEVICES."""
    import ray
    from prefect import flow, task
    from prefect_ray import RayTaskRunner

    from flows.fm import _ray_gpu_options

    assert ray.cluster_resources().get("GPU") == 2

    @task
    def placement() -> tuple[list, str | None]:
        import ray

        return [str(g) for g in ray.get_gpu_ids()], os.environ.get("CUDA_VISIBLE_DEVICES")

    cases = [("tag", "cuda", "auto"), ("ingest", "cuda", "auto"), ("tag", "cpu", "auto"),
             ("cache", "cpu", "cuda"), ("cache", "cuda", "cpu")]

    @flow(task_runner=RayTaskRunner(init_kwargs={"num_cpus": 2, "num_gpus": 2}))
    def probe() -> list:  # the module's Ray instance (already initialized) for every case
        results = []
        for stage, device, runtime_device in cases:
            cfg = load_config("demo", ["runtime.task_runner=ray", f"tag.device={device}",
                                       f"runtime.device={runtime_device}"])
            with _ray_gpu_options(stage, cfg):
                # two GPU tasks at once take both GPUs; one task each shows where the others go (each task
                # may start a Ray worker process that imports Prefect: seconds of CPU here)
                futures = [placement.submit() for _ in range(2 if stage == "tag" and device == "cuda" else 1)]
            results.append([f.result() for f in futures])
        return results

    on_gpus, ingest, tag_cpu, cache_cuda, cache_cpu = probe()
    assert all(len(ids) == 1 and ids[0] in {"0", "1"} and visible == ids[0] for ids, visible in on_gpus), on_gpus
    assert len(on_gpus) == 2
    assert all(ids == [] for ids, _ in ingest)  # not a GPU stage
    assert all(ids == [] for ids, _ in tag_cpu)  # a GPU stage on the CPU
    # Cache has no device of its own: runtime.device decides.
    assert all(len(ids) == 1 and visible == ids[0] for ids, visible in cache_cuda), cache_cuda
    assert all(ids == [] for ids, _ in cache_cpu)
