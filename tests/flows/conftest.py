"""A real Prefect server on a free loopback port, with `fm serve` running against it (session-scoped)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from flows.deploy import api_healthy

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def prefect_env(tmp_path_factory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_API_URL=api_url,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="INFO")
    env.pop("PREFECT_PROFILES_PATH", None)
    log = open(home / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=ROOT)
    deadline = time.monotonic() + 120
    while not api_healthy(api_url):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            pytest.fail(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield env
    _stop(proc)


def deployment_registered(api_url: str, name: str) -> bool:
    """Whether the server knows deployment `flow/deployment` (one HTTP request: `prefect deployment ls`
    costs a Python start with Prefect's imports every poll)."""
    try:
        with urllib.request.urlopen(f"{api_url}/deployments/name/{name}", timeout=5) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="session")
def fm_serve(prefect_env) -> dict[str, str]:
    """`fm serve` in the background; waits until fm/full is registered."""
    log_path = Path(prefect_env["PREFECT_HOME"]) / "serve.log"
    log = open(log_path, "wb")
    # The runner looks for scheduled runs (and cancellations) every PREFECT_RUNNER_POLL_FREQUENCY seconds,
    # 10 by default: each deployment run here would wait ~5 s for nothing.
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "-c", "demo"],
                            env=dict(prefect_env, PREFECT_RUNNER_POLL_FREQUENCY="1"),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
    deadline = time.monotonic() + 120
    while not deployment_registered(prefect_env["PREFECT_API_URL"], "fm/full"):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            pytest.fail(f"fm serve did not register deployments: {log_path.read_text()[-3000:]}")
        time.sleep(0.5)
    yield prefect_env
    _stop(proc)
