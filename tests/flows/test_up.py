"""`fm up` / `fm serve` as a user meets them: one Prefect server per `fm up` (no temporary one beside it), a second
`fm up` that says what holds which port, Ctrl-C / SIGTERM that leave no server behind, and a hint that runs
verbatim from a shell without the venv on PATH."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from flows.deploy import api_healthy
from tests.flows.conftest import free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILES_PATH")}
    bare_path = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                if Path(p).resolve() != Path(sys.executable).parent.resolve())
    return {**env, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PYTHONUNBUFFERED": "1", "PATH": bare_path}  # the venv not activated, as for a new user


def _spawn(args: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], env=env, cwd=cwd,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = log.read_text(errors="replace")
        if text in out:
            return out
        if proc.poll() is not None:
            pytest.fail(f"exited {proc.returncode} before printing {text!r}:\n{out[-4000:]}")
        time.sleep(0.5)
    pytest.fail(f"no {text!r} within {timeout}s:\n{log.read_text(errors='replace')[-4000:]}")


def _server_processes(parent: subprocess.Popen) -> list[psutil.Process]:
    """The `prefect server start` started by an `fm up`, with everything under it."""
    found = []
    for child in psutil.Process(parent.pid).children(recursive=False):
        if "server" in child.cmdline() and "start" in child.cmdline():
            found += [child, *child.children(recursive=True)]
    return found


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _kill(proc: subprocess.Popen | None, extra: list[psutil.Process] = ()) -> None:
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    for p in _alive(list(extra)):
        p.kill()


def test_up_twice_then_ctrl_c_leaves_no_server(tmp_path):
    env, port, files_port = _env(tmp_path / "home"), free_port(), free_port()
    api = f"http://127.0.0.1:{port}/api"
    common = ["-o", f"data_root={tmp_path / 'data'}", "--port", str(port), "--files-port", str(files_port)]
    first = _spawn(["up", *common], env, tmp_path, tmp_path / "up1.log")
    third, server = None, []
    try:
        out = _wait_for(tmp_path / "up1.log", "in another shell:", first)
        server = _server_processes(first)
        assert server, "fm up started no `prefect server start` child"
        assert f"started a local Prefect server at {api}" in out
        assert f"read-only at http://127.0.0.1:{files_port}" in out

        # The hint runs verbatim in a shell without the venv on PATH (here with `deployment ls`).
        hint = re.search(r"in another shell: (.*)", out).group(1)
        assert hint.startswith(f"PREFECT_API_URL={api} ") and hint.endswith(" deployment run fm/full --watch")
        listing = hint.replace("deployment run fm/full --watch", "deployment ls")
        deadline = time.monotonic() + 120
        while True:  # serve registers the deployments a few seconds after the hint
            ls = subprocess.run(["bash", "-c", listing], env=env, cwd=tmp_path, capture_output=True, text=True,
                                timeout=120)
            if "fm/full" in ls.stdout or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert ls.returncode == 0 and "fm/full" in ls.stdout, ls.stdout + ls.stderr

        # A second `fm up` on the same ports: it finds the Prefect server, then names who holds the files port.
        second = subprocess.run([sys.executable, "-m", "flows.cli", "up", *common], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"a Prefect server already answers at {api}" in second.stdout
        assert f"127.0.0.1:{files_port} is taken by pid {first.pid}" in second.stderr
        assert f"--files-port {files_port + 1}" in second.stderr and "--no-files" in second.stderr
        assert "Traceback" not in second.stderr and "Address already in use" not in second.stderr

        # A third, without a file server, reuses the server and leaves it running when it is stopped.
        third = _spawn(["up", "--port", str(port), "--no-files"], env, tmp_path, tmp_path / "up3.log")
        out3 = _wait_for(tmp_path / "up3.log", "in another shell:", third)
        assert f"already answers at {api}" in out3 and "started a local" not in out3
        time.sleep(3)  # into serve: its own SIGTERM handling
        third.send_signal(signal.SIGTERM)
        third.wait(timeout=60)
        assert api_healthy(api) and len(_alive(server)) == len(server)

        # Ctrl-C of the first stops its server: no process of it remains, the port answers no more.
        first.send_signal(signal.SIGINT)
        first.wait(timeout=90)
        out = (tmp_path / "up1.log").read_text(errors="replace")
        assert _alive(server) == [], [p.cmdline() for p in _alive(server)]
        assert not api_healthy(api, timeout=1)
        assert "stopped the Prefect server" in out
        for noise in ("temporary server", "database is locked", "Traceback"):  # one server, ours
            assert noise not in out, out[-4000:]
    finally:
        _kill(third)
        _kill(first, server)


def test_sigterm_while_the_server_starts_stops_it(tmp_path):
    """Killed during start-up (before serving): the half-started server goes too."""
    env, port = _env(tmp_path / "home"), free_port()
    proc = _spawn(["up", "--port", str(port), "--no-files"], env, tmp_path, tmp_path / "up.log")
    server: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while not server and time.monotonic() < deadline:
            server = _server_processes(proc) if proc.poll() is None else []
            time.sleep(0.2)
        assert server, (tmp_path / "up.log").read_text()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        time.sleep(0.5)
        assert _alive(server) == []
    finally:
        _kill(proc, server)


def test_serve_without_a_server_fails_clearly_and_fast(tmp_path):
    env = _env(tmp_path / "home")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "serve"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "no Prefect server" in proc.stderr and "fm up" in proc.stderr and "PREFECT_API_URL=" in proc.stderr
    down = f"http://127.0.0.1:{free_port()}/api"
    gone = subprocess.run([sys.executable, "-m", "flows.cli", "serve"], env={**env, "PREFECT_API_URL": down},
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert gone.returncode == 2 and f"no Prefect server answers at PREFECT_API_URL={down}" in gone.stderr
    assert time.monotonic() - started < 30  # two interpreter start-ups; no temporary server
    for p in (proc, gone):
        assert "Traceback" not in p.stderr and "temporary server" not in p.stdout + p.stderr


def test_up_names_a_non_prefect_process_on_its_port(tmp_path):
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "flows.cli", "up", "--port", str(port), "--no-files"],
                              env=_env(tmp_path / "home"), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"port {port} is taken by pid {os.getpid()}" in proc.stderr
    assert "does not answer as a Prefect server" in proc.stderr and f"--port {port + 1}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_use_api_url_reaches_an_already_imported_prefect(tmp_path):
    """Prefect snapshots PREFECT_API_URL at import; use_api_url must reach clients made afterwards."""
    code = ("import prefect\nfrom prefect.settings import get_current_settings\n"
            "assert get_current_settings().api.url is None\n"
            "from flows.deploy import use_api_url\nuse_api_url('http://127.0.0.1:9/api')\n"
            "print(get_current_settings().api.url)")
    env = _env(tmp_path / "home")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "http://127.0.0.1:9/api"


def test_up_overrides_become_every_deployments_default():
    from flows.deploy import build_deployments

    served = {d.name: d for d in build_deployments("demo", ["data_root=/data/x"])}
    assert served["full"].parameters == {"config": "demo", "overrides": ["data_root=/data/x"]}
    assert served["bucket"].parameters["overrides"] == ["data_root=/data/x"]
    assert served["ab"].parameters["ab"] is True and served["ab"].parameters["overrides"] == ["data_root=/data/x"]


SWALLOWED_SIGTERM = """
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
from flows.cli import _unwind_on_signals, _unwinding

class Finaliser:
    def __del__(self):  # the signal arrives while a finaliser runs: its KeyboardInterrupt is 'ignored'
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(100_000))

_unwind_on_signals(retry_s=0.2)
try:
    Finaliser()
    print("swallowed", flush=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        time.sleep(0.05)
    print("still running", flush=True)
except KeyboardInterrupt as exc:
    print("unwound", exc, flush=True)
finally:
    _unwinding.set()
"""


def test_a_sigterm_swallowed_by_a_finaliser_is_sent_again_until_fm_up_unwinds():
    """Measured: a SIGTERM whose KeyboardInterrupt landed in asyncio's transport __del__ ("Exception ignored")
    left `fm up` serving. A swallowed interrupt is sent again (and only a swallowed one: see the next test)."""
    root = str(Path(__file__).resolve().parents[2])
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", SWALLOWED_SIGTERM, root], capture_output=True, text=True, timeout=60)
    assert "Exception ignored" in proc.stderr  # the first KeyboardInterrupt really was swallowed
    assert proc.stdout.split() == ["swallowed", "unwound", "SIGTERM"], proc.stdout + proc.stderr
    assert time.monotonic() - started < 15


UNWINDING_SLOWLY = """
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
from flows.cli import _unwind_on_signals, _unwinding

_unwind_on_signals(retry_s=0.1)
try:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
except KeyboardInterrupt:
    try:
        time.sleep(1.5)  # a clean-up that takes longer than retry_s (stopping a server): nothing may cut it
        print("clean-up done", flush=True)
    except KeyboardInterrupt:
        print("clean-up cut", flush=True)
finally:
    _unwinding.set()
"""


def test_an_unwinding_under_way_is_not_cut_by_a_second_signal():
    root = str(Path(__file__).resolve().parents[2])
    proc = subprocess.run([sys.executable, "-c", UNWINDING_SLOWLY, root], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["clean-up", "done"], proc.stdout + proc.stderr
