"""Every shell command in README.md and docs/ runs verbatim, as a new user pastes it, on the demo.

The commands are read from the ```bash blocks of the files themselves (a changed README is what gets run), in a
fresh folder that looks like a checkout after `make demo`'s install step (`.venv` linked to this venv; the tiny
models and mini-booru cache linked so they are not built again), with the venv NOT on PATH. A command found in
the docs that this test does not know fails it: every new command is either run here or exempted with a reason.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from flows.deploy import api_healthy

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]
ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
API = "http://127.0.0.1:4200/api"

# Commands not run here, and why.
EXEMPT = {
    "make demo": "= install + `.venv/bin/fm run -c demo`; the install is what CI's `make test` does, the run is "
                 "`.venv/bin/fm run` below",
    "make test": "CI runs it (this test is part of it)",
}


def shell_commands(path: Path) -> list[str]:
    """The commands of every ```bash / ```sh / ```console block: comments and blank lines dropped."""
    commands, inside = [], False
    for line in path.read_text().splitlines():
        fence = line.strip()
        if fence.startswith("```"):
            inside = not inside and fence[3:].strip() in ("bash", "sh", "shell", "console")
            continue
        if inside:
            command = re.sub(r"\s+#\s.*$", "", line.strip()).strip()  # a trailing "  # comment"
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def documented() -> list[str]:
    return [c for path in DOCS for c in shell_commands(path)]


def test_the_docs_list_the_commands_this_test_knows():
    """Guards the test itself: the commands it runs are the README's, and a new one is not silently skipped."""
    found = documented()
    runs = {c for c in found if c not in EXEMPT}
    known = set(RUNS) | {SERVER_START}
    assert runs <= known, f"documented commands this test neither runs nor exempts: {sorted(runs - known)}"
    assert known <= set(found), f"commands this test runs that the docs no longer show: {sorted(known - set(found))}"


def _sandbox(tmp: Path) -> Path:
    box = tmp / "checkout"
    (box / ".data").mkdir(parents=True)
    os.symlink(ROOT / ".venv", box / ".venv")
    (ROOT / ".data" / "cache").mkdir(parents=True, exist_ok=True)
    os.symlink(ROOT / ".data" / "cache", box / ".data" / "cache")  # tiny models + mini-booru, built once
    return box


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "VIRTUAL_ENV"))}
    venv_bin = str(ROOT / ".venv" / "bin")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    env["PREFECT_HOME"] = str(home)
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    return env


def _sh(command: str, box: Path, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=box, env=env, capture_output=True, text=True,
                          timeout=timeout)


# What each command must do, verbatim, in order (the demo preset; data under the sandbox's .data/demo).
def _ok(proc: subprocess.CompletedProcess, box: Path | None = None) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _run_all(proc, box):
    _ok(proc)
    checkpoint = re.search(r"checkpoint: (\S+\.safetensors)", proc.stdout)
    assert checkpoint and (box / checkpoint.group(1)).is_file(), proc.stdout[-2000:]


def _rerun_bucket(proc, box):
    _ok(proc)
    assert re.search(r"bucket\s*│\s*built", proc.stdout), proc.stdout[-2000:]


def _real_recipe(proc, box):
    # The seed recipe, unedited: the preflight stops it before anything starts, saying what to change.
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "✗" in proc.stderr and "Traceback" not in proc.stderr
    assert "temporary server" not in proc.stdout + proc.stderr


def _inspect(proc, box):
    _ok(proc)
    assert proc.stdout.startswith("cache ") and "OK:" in proc.stderr


def _check(proc, box):
    _ok(proc)


def _status(proc, box):
    _ok(proc)
    for stage in ("ingest", "dedup", "tag", "quality", "bucket", "cache", "train", "eval"):
        assert stage in proc.stdout


def _sample(proc, box):
    _ok(proc)
    pngs = [line for line in proc.stdout.split() if line.endswith(".png")]
    assert pngs and all((box / p).exists() for p in pngs), proc.stdout[-2000:]


RUNS = {
    ".venv/bin/fm run": _run_all,
    ".venv/bin/fm run bucket -o bucket.resolution=320 --force": _rerun_bucket,
    ".venv/bin/fm run -c nai-v2-fm": _real_recipe,
    ".venv/bin/fm inspect cache": _inspect,
    ".venv/bin/fm check": _check,
    ".venv/bin/fm status": _status,
    '.venv/bin/fm sample current "1girl, solo, smile" --sampler dpmpp_2m --images-per-prompt 2 --steps 12': _sample,
    '.venv/bin/fm sample current "1girl, solo, smile, masterpiece, good score"': _sample,
    # run against the server `fm up` started (the block's `export` comes first)
    f"export PREFECT_API_URL={API}": None,
    ".venv/bin/prefect deployment run fm/full --watch": None,
    ".venv/bin/prefect deployment run fm/bucket -p force=true --watch": None,
}
SERVER_START = ".venv/bin/fm up"
SERVER_BLOCK = [f"export PREFECT_API_URL={API}", ".venv/bin/prefect deployment run fm/full --watch",
                ".venv/bin/prefect deployment run fm/bucket -p force=true --watch"]


def _server_processes() -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "prefect" in cmd and ("server start" in cmd or "prefect.server.api.server" in cmd) and "4200" in cmd:
            found.append(p)
    return found


def _served_runs_reused_and_rebuilt_what_they_should(env: dict[str, str]) -> None:
    """Read back through the Prefect client: the served fm/full (after `fm run` built everything) reused every
    stage and published each stage's artifacts; fm/bucket with force ran the bucket task alone and rebuilt it.
    (tests/flows/test_deployments.py covers a served run that builds, and a changed config's rebuilds.)"""
    from pipeline_config.load import load_config
    from tasks.phases import PHASE_STAGES, phase_names
    from tasks.registry import implemented_stages
    from tests.flows.test_deployments import latest_flow_run_id, read_run, stage_state

    stages = implemented_stages()
    phases = phase_names(load_config("demo"))  # the demo trains in two phases: their stages run once each
    assert phases == ["base", "hires"]
    expected = [s for s in stages if s not in PHASE_STAGES] + [f"{s}-{p}" for s in PHASE_STAGES for p in phases]
    artifacts, task_names = read_run(env, latest_flow_run_id(env, "fm/full"))
    assert [n for n in task_names if "-shard-" not in n and not n.endswith("-merge")] == sorted(expected)
    for stage in stages:
        assert {f"fm-{stage}-summary", f"fm-{stage}-manifest"} <= set(artifacts), (stage, sorted(artifacts))
        assert stage_state(artifacts, stage) == "cached", stage
    artifacts, task_names = read_run(env, latest_flow_run_id(env, "fm/bucket"))
    assert task_names == ["bucket-base", "bucket-hires"] and stage_state(artifacts, "bucket") == "built"


def test_every_documented_command_runs_verbatim(tmp_path):
    if api_healthy(API, timeout=0.5):
        pytest.skip("a Prefect server already answers on port 4200, where the README's commands point")
    box = _sandbox(tmp_path)
    env = _env(tmp_path / "prefect-home")
    found = documented()
    for command in found:
        check = RUNS.get(command)
        if command in EXEMPT or command == SERVER_START or check is None:
            continue
        check(_sh(command, box, env), box)

    # The server block: `fm up` in one shell, the rest in another, as the README says.
    log = open(tmp_path / "fm-up.log", "wb")
    up = subprocess.Popen(["bash", "-c", f"exec {SERVER_START}"], cwd=box, env=env, stdout=log,
                          stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:  # served once the deployments are registered
            listed = _sh(f"PREFECT_API_URL={API} .venv/bin/prefect deployment ls", box, env, timeout=60)
            if "fm/full" in listed.stdout or "full" in listed.stdout and "fm" in listed.stdout:
                break
            assert up.poll() is None, (tmp_path / "fm-up.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "fm-up.log").read_text()[-3000:]
            time.sleep(1)
        hint = (tmp_path / "fm-up.log").read_text()
        assert "prefect deployment run fm/full --watch" in hint
        block = [c for c in found if c in SERVER_BLOCK]
        assert block == SERVER_BLOCK
        proc = _sh("set -e\n" + "\n".join(block), box, env)
        _ok(proc)
        assert proc.stdout.count("Completed") >= 2, proc.stdout[-3000:]
        _served_runs_reused_and_rebuilt_what_they_should({**env, "PREFECT_API_URL": API})
    finally:
        os.killpg(up.pid, signal.SIGINT)  # Ctrl-C: stops the server it started too
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            raise
    deadline = time.monotonic() + 30
    while _server_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _server_processes(), "fm up left its Prefect server running"
