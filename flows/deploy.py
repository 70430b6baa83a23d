"""Deployments of the flow `fm` (fm/full and fm/<stage>), `fm serve` and `fm up`."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from prefect import serve

from flows.fm import fm
from tasks.registry import implemented_stages

DEFAULT_API_URL = "http://127.0.0.1:4200/api"


def build_deployments(config: str):
    """fm/full runs every implemented stage; fm/<stage> reruns one. `-p config=...` overrides per run."""
    deployments = [
        fm.to_deployment(
            name="full",
            parameters={"config": config},
            description="The whole pipeline, every stage in DAG order (cached stages are reused).",
            tags=["booruflow"],
        )
    ]
    deployments.append(
        fm.to_deployment(
            name="ab",
            parameters={"config": config, "ab": True},
            description="Flow vs DDPM objective on the same data and step budget, evaluated the same way.",
            tags=["booruflow", "ab"],
        )
    )
    for stage in implemented_stages():
        deployments.append(
            fm.to_deployment(
                name=stage,
                parameters={"config": config, "stages": [stage]},
                description=f"Rerun the {stage} stage alone; downstream stages pick up its output next run.",
                tags=["booruflow", stage],
            )
        )
    return deployments


def api_healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def start_local_server(api_url: str, log_path: Path, wait_s: float = 90.0) -> subprocess.Popen | None:
    """Start `prefect server start` (SQLite) in the background unless one already answers at api_url."""
    if api_healthy(api_url):
        return None
    from urllib.parse import urlparse

    parsed = urlparse(api_url)
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_API_URL=api_url)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", parsed.hostname or "127.0.0.1",
         "--port", str(parsed.port or 4200)],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if api_healthy(api_url):
            return proc
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with code {proc.returncode}; see {log_path}")
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"prefect server did not answer at {api_url} within {wait_s:.0f}s; see {log_path}")


async def ensure_gpu_limit(slots: int, name: str | None = None) -> None:
    """The global concurrency limit GPU stages take a slot of, so two runs never share one GPU."""
    from prefect.client.orchestration import get_client

    from flows.fm import GPU_LIMIT

    async with get_client() as client:
        await client.upsert_global_concurrency_limit_by_name(name or GPU_LIMIT, slots)


def serve_all(config: str, limit: int | None = None, gpu_slots: int = 1) -> None:
    """Register fm/full and fm/<stage> with the server in PREFECT_API_URL and execute their runs."""
    import asyncio

    from pipeline_config.load import load_config

    asyncio.run(ensure_gpu_limit(gpu_slots, load_config(config).runtime.gpu_limit))
    serve(*build_deployments(config), limit=limit)
