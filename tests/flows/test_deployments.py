"""End to end through a real Prefect server: `prefect deployment run fm/full --watch` on the demo preset,
then every stage's artifacts read back through the Prefect client, then a changed config's partial rebuild."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.registry import implemented_stages

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def deployment_run(env: dict[str, str], name: str, params: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "prefect", "deployment", "run", name, "--watch", "--params", json.dumps(params)],
        env=env, capture_output=True, text=True, cwd=ROOT, timeout=900,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _against(env: dict[str, str], coro_fn, *args):
    """Run a Prefect client coroutine against the test's server (not this process's ephemeral API)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        return asyncio.run(coro_fn(*args))


def latest_flow_run_id(env: dict[str, str], deployment: str):
    return _against(env, _latest_flow_run_id, env, deployment)


async def _latest_flow_run_id(env, deployment):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    async with get_client() as client:
        dep = await client.read_deployment_by_name(deployment)
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

        runs = await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
            sort=FlowRunSort.START_TIME_DESC, limit=1,
        )
        return runs[0].id


def read_run(env: dict[str, str], flow_run_id) -> tuple[dict[str, object], list[str]]:
    """(artifact key -> artifact, task run names) of one flow run, through the Prefect client."""
    return _against(env, _read_run, flow_run_id)


async def _read_run(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
    )

    async with get_client() as client:
        arts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
        tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {a.key: a for a in arts if a.key}, sorted(t.name for t in tasks)


def stage_state(artifacts: dict, stage: str) -> str:
    data = artifacts[f"fm-{stage}-summary"].data
    return "cached" if f"# {stage} — cached" in data else "built"


@pytest.fixture(scope="module")
def demo_params(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("demo-root")
    # The demo preset, made smaller so four pipeline runs fit the test budget (same stages, same code).
    # One phase here (the README test runs the demo's two through fm up; tests/train/test_phases.py the chaining).
    # 4 steps still checkpoint (every 2), validate (every 2), log (every 2) and sample (at the end, 4 steps).
    small = ["train.phases=[]", "ingest.embedded.posts=90", "ingest.embedded.max_side=384", "train.max_steps=4",
             "train.checkpoint_every=2", "train.sampling.every=4", "train.sampling.steps=4",
             "train.validation.every=2", "train.logging.every=2",
             "eval.min_samples=3", "eval.max_concepts=2", "eval.images_per_concept=2", "eval.steps=4"]
    return {"config": "demo", "overrides": [f"data_root={root}", *small]}


def test_full_then_a_changed_config_rebuilds_from_bucket(fm_serve, demo_params):
    env = fm_serve
    stages = implemented_stages()
    assert stages, "no stage is implemented"
    deployment_run(env, "fm/full", demo_params)
    artifacts, task_names = read_run(env, latest_flow_run_id(env, "fm/full"))
    stage_tasks = [n for n in task_names if "-shard-" not in n and not n.endswith("-merge")]
    assert stage_tasks == sorted(stages)
    assert any(n.startswith("tag-shard-") for n in task_names)  # the tag stage maps its shards
    for stage in stages:
        assert f"fm-{stage}-summary" in artifacts, f"{stage}: no summary artifact ({sorted(artifacts)})"
        assert f"fm-{stage}-manifest" in artifacts
        link = artifacts[f"fm-{stage}-manifest"]  # Prefect stores link artifacts as markdown links
        assert link.type == "markdown" and "manifest.json" in link.data and demo_params["overrides"][0][10:] in link.data
        assert stage_state(artifacts, stage) == "built"
        assert any(k.startswith(f"fm-{stage}-") and a.type == "table" for k, a in artifacts.items()), stage

    # Reuse of every stage by a second served fm/full and fm/bucket with force alone: the README test runs
    # both against `fm up` (tests/docs/test_readme_commands.py).
    # A changed bucket config: upstream stages are reused, bucket and every later stage rebuild.
    changed = {**demo_params, "overrides": demo_params["overrides"] + ["bucket.seed=12345"]}
    deployment_run(env, "fm/full", changed)
    artifacts, _ = read_run(env, latest_flow_run_id(env, "fm/full"))
    order = list(stages)
    for stage in order:
        expected = "built" if order.index(stage) >= order.index("bucket") else "cached"
        assert stage_state(artifacts, stage) == expected, stage


def _worker_pids() -> list[int]:
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"])
            if any("tasks.train.worker" in part for part in (p.info["cmdline"] or []))]


def test_cancelling_a_training_run_leaves_no_accelerate_children(fm_serve, demo_params):
    """Cancel fm/train while `accelerate launch` runs it: the flow run ends Cancelled and no worker remains."""
    import time

    env = fm_serve
    params = {**demo_params, "force": True,
              "overrides": demo_params["overrides"] + ["train.launcher=accelerate", "train.num_processes=1",
                                                       "train.max_steps=100000", "train.epochs=1000"]}
    proc = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", "fm/train", "--params",
                           json.dumps(params)], env=env, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_id = latest_flow_run_id(env, "fm/train")
    deadline = time.monotonic() + 300
    while not _worker_pids():
        assert time.monotonic() < deadline, "accelerate workers never started"
        time.sleep(1)
    time.sleep(3)  # let it train a little
    cancel = subprocess.run([sys.executable, "-m", "prefect", "flow-run", "cancel", str(run_id)], env=env,
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    deadline = time.monotonic() + 120
    while _worker_pids() or _against(env, _state_name, run_id) not in ("Cancelled", "Crashed", "Failed"):
        assert time.monotonic() < deadline, f"still running: workers {_worker_pids()}"
        time.sleep(1)
    assert _against(env, _state_name, run_id) == "Cancelled"
    assert not _worker_pids()


async def _state_name(flow_run_id):
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return (await client.read_flow_run(flow_run_id)).state.name

