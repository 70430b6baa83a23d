"""Deployments of the flow `fm` (fm/full and fm/<stage>), `fm serve` and `fm up`.

Prefect is imported only inside the functions that need it: Prefect reads PREFECT_API_URL into its settings
when it is first imported, so `fm up` must settle the URL (start or find the server) before that happens,
or every client in the process (serve included) would start a temporary in-process server of its own.
"""
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
from typing import Sequence
from urllib.parse import urlparse

from data_contracts.errors import BooruflowError
from tasks.registry import implemented_stages

DEFAULT_PORT = 4200
DEFAULT_API_URL = f"http://127.0.0.1:{DEFAULT_PORT}/api"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class StackError(BooruflowError):
    """The local stack (Prefect server, file server) cannot start; the message says what holds what."""


def build_deployments(config: str, overrides: Sequence[str] = ()):
    """fm/full runs every implemented stage; fm/<stage> reruns one. `-p config=...` overrides per run;
    `overrides` (from `fm up/serve -o`) become every deployment's default `overrides` parameter."""
    from flows.fm import fm

    base = {"config": config, **({"overrides": list(overrides)} if overrides else {})}
    deployments = [
        fm.to_deployment(
            name="full",
            parameters=dict(base),
            description="The whole pipeline, every stage in DAG order (cached stages are reused).",
            tags=["booruflow"],
        )
    ]
    deployments.append(
        fm.to_deployment(
            name="ab",
            parameters={**base, "ab": True},
            description="Flow vs DDPM objective on the same data and step budget, evaluated the same way.",
            tags=["booruflow", "ab"],
        )
    )
    for stage in implemented_stages():
        deployments.append(
            fm.to_deployment(
                name=stage,
                parameters={**base, "stages": [stage]},
                description=f"Rerun the {stage} stage alone; downstream stages pick up its output next run.",
                tags=["booruflow", stage],
            )
        )
    return deployments


# --- the API URL ---------------------------------------------------------------------------------------------
def api_url_for(port: int, host: str = "127.0.0.1") -> str:
    return f"http://{host}:{port}/api"


def api_healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def use_api_url(api_url: str) -> None:
    """Point every Prefect client of this process (and its children) at api_url.

    Prefect snapshots the environment into its global settings when first imported; if it already was,
    refresh that snapshot so a client made from now on does not start a temporary server.
    """
    os.environ["PREFECT_API_URL"] = api_url
    if "prefect.context" in sys.modules:
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()


def configured_api_url() -> str | None:
    """PREFECT_API_URL from the environment, else from the active Prefect profile (imports Prefect)."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return str(url) if url else None


# --- who holds a port ----------------------------------------------------------------------------------------
def port_free(host: str, port: int) -> bool:
    """Could a server bind host:port now? (SO_REUSEADDR as uvicorn and http.server use it.)"""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
        return True
    except OSError:
        return False


def port_owner(port: int) -> str:
    """'pid N (`command`)' of the process listening on port, as far as this user may see."""
    try:
        import psutil
    except ImportError:
        return "another process"
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return "another process"
    for conn in conns:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            if conn.pid is None:
                return "a process of another user"
            try:
                cmd = " ".join(psutil.Process(conn.pid).cmdline())[:160]
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                cmd = "?"
            return f"pid {conn.pid} (`{cmd}`)"
    return "another process"


def check_files_port(host: str, port: int) -> None:
    if not port_free(host, port):
        raise StackError(f"the data file server's port {host}:{port} is taken by {port_owner(port)} (another "
                         f"`fm up`?); choose another: --files-port {port + 1}, or --no-files")


# --- the local Prefect server --------------------------------------------------------------------------------
def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def start_local_server(api_url: str, log_path: Path, wait_s: float = 90.0) -> subprocess.Popen | None:
    """Start `prefect server start` (SQLite) in its own process group unless a Prefect server already
    answers at api_url (then None: it is reused). A port held by something else is a StackError naming it."""
    if api_healthy(api_url):
        return None
    parsed = urlparse(api_url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or DEFAULT_PORT
    if host not in LOOPBACK_HOSTS:
        raise StackError(f"no Prefect server answers at {api_url} (PREFECT_API_URL); start it, or unset "
                         "PREFECT_API_URL to let `fm up` start a local one")
    if not port_free(host, port):
        deadline = time.monotonic() + 5  # a server still starting up answers within seconds
        while time.monotonic() < deadline:
            if api_healthy(api_url):
                return None
            time.sleep(0.5)
        raise StackError(f"port {port} is taken by {port_owner(port)}, which does not answer as a Prefect server "
                         f"at {api_url}/health; stop it or choose another port: fm up --port {port + 1}")
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_API_URL=api_url)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,  # its own process group: Ctrl-C is ours to relay, stop_server kills it whole
        )
    try:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if api_healthy(api_url):
                return proc
            if proc.poll() is not None:
                raise StackError(f"prefect server exited with code {proc.returncode}; {log_path} ends:\n"
                                 + _log_tail(log_path))
            time.sleep(0.5)
        raise StackError(f"prefect server did not answer at {api_url} within {wait_s:.0f}s; see {log_path}")
    except BaseException:  # a failed start or Ctrl-C while waiting: leave nothing behind
        stop_server(proc)
        raise


def stop_server(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Stop a server started by start_local_server and everything it spawned (its process group)."""
    if proc.poll() is not None:
        return
    try:
        import psutil

        children = psutil.Process(proc.pid).children(recursive=True)
    except Exception:  # psutil missing or the process just ended: the group kill below still applies
        children = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=timeout)
            break
        except subprocess.TimeoutExpired:
            continue
    for child in children:  # a child that left the group (its own session) is stopped too
        try:
            if child.is_running():
                child.kill()
        except Exception:
            pass


# --- serving -------------------------------------------------------------------------------------------------
async def ensure_gpu_limit(slots: int, name: str | None = None) -> None:
    """The global concurrency limit GPU stages take a slot of, so two runs never share one GPU."""
    from prefect.client.orchestration import get_client

    from flows.fm import GPU_LIMIT

    async with get_client() as client:
        await client.upsert_global_concurrency_limit_by_name(name or GPU_LIMIT, slots)


def serve_all(config: str, limit: int | None = None, gpu_slots: int = 1, overrides: Sequence[str] = ()) -> None:
    """Register fm/full and fm/<stage> with the server in PREFECT_API_URL and execute their runs."""
    import asyncio

    from prefect import serve

    from pipeline_config.load import load_config

    asyncio.run(ensure_gpu_limit(gpu_slots, load_config(config, overrides).runtime.gpu_limit))
    # Prefect's own banner suggests a bare `prefect`, which is not on PATH without the venv: the CLI prints
    # a runnable command instead (serving_hint).
    serve(*build_deployments(config, overrides), limit=limit, print_starting_message=False)


def deployment_names() -> list[str]:
    return ["fm/full", "fm/ab", *(f"fm/{s}" for s in implemented_stages())]
