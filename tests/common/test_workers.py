"""The one worker layer (tasks/common/workers.py) with real child processes: lines and events relayed, a
user error back as the same error, a crash quoted, and a cancel that leaves no process of the group."""
from __future__ import annotations

import threading
import time

import psutil
import pytest

from data_contracts.errors import ConfigError, ContractError, StageError
from tasks.common import workers
from tasks.common.process_cache import ProcessCache
from tasks.common.workers import (
    EXIT_USER_ERROR,
    REPO_ROOT,
    Supervisor,
    child_env,
    python_call,
)
from tests.common.worker_children import PREFIX

CHILDREN = "tests.common.worker_children"
ERRORS = {"ConfigError": ConfigError, "StageError": StageError, "ContractError": ContractError}


def _gone(pid: int, timeout_s: float = 10.0) -> bool:
    """The process has exited (a zombie waiting for init to reap it counts as gone)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_child_env_names_the_devices_and_keeps_the_rest():
    base = {"CUDA_VISIBLE_DEVICES": "2,5", "PYTHONPATH": "/elsewhere", "NCCL_NVLS_ENABLE": "1"}
    assert child_env("5", base)["CUDA_VISIBLE_DEVICES"] == "5"
    assert child_env("cpu", base)["CUDA_VISIBLE_DEVICES"] == ""  # the CPU worker must see no GPU at all
    env = child_env(None, base, NCCL_NVLS_ENABLE="0", OTHER="x")
    assert env["CUDA_VISIBLE_DEVICES"] == "2,5"  # accelerate hands the GPUs out itself
    assert env["NCCL_NVLS_ENABLE"] == "1" and env["OTHER"] == "x"  # defaults never override the user's
    assert env["PYTHONPATH"].split(":") == [str(REPO_ROOT), "/elsewhere"] and env["PYTHONUNBUFFERED"] == "1"


def test_lines_and_events_are_relayed_from_a_real_child():
    lines: list[tuple[str, str]] = []
    events: list[dict] = []
    with Supervisor(on_line=lambda w, line: lines.append((w.label, line)),
                    on_event=lambda w, event: events.append(event), event_prefix=PREFIX) as supervisor:
        worker = supervisor.start("talker", python_call(f"{CHILDREN}:talk", "3"), env=child_env("cpu"), label="t0")
        supervisor.relay()
    supervisor.check()
    assert worker.proc.returncode == 0
    assert events == [{"i": 0}, {"i": 1}, {"i": 2}]  # found behind another program's prefix too
    assert lines == [("t0", "line 0"), ("t0", "line 1"), ("t0", "line 2"), ("t0", PREFIX + "{not json"),
                     ("t0", "on stderr")]  # a prefixed line that is no JSON stays a line; stderr is merged


@pytest.mark.parametrize("kind", sorted(ERRORS))
def test_a_user_error_in_the_child_is_the_same_error_in_the_parent(kind):
    with Supervisor(on_line=lambda w, line: None) as supervisor:
        worker = supervisor.start("tag worker on gpu1", python_call(f"{CHILDREN}:give_up", kind, "set tag.model"),
                                  env=child_env("cpu"))
        supervisor.relay()
    assert worker.proc.returncode == EXIT_USER_ERROR
    with pytest.raises(ERRORS[kind]) as caught:
        supervisor.check()
    assert type(caught.value) is ERRORS[kind] and str(caught.value) == "tag worker on gpu1: set tag.model"
    with pytest.raises(ERRORS[kind], match="^training failed: set tag.model$"):
        supervisor.check(user_error="training failed: {message}")


def test_a_crash_is_a_stage_error_quoting_the_last_lines():
    with Supervisor(on_line=lambda w, line: None) as supervisor:
        supervisor.start("cache participant 1", python_call(f"{CHILDREN}:crash"), env=child_env("cpu"))
        supervisor.relay()
    with pytest.raises(StageError, match=r"cache participant 1 exited with code 1; last output:\n"
                                         r"about to fail\n(.|\n)*ValueError: a bug, not a user error") as caught:
        supervisor.check()
    assert not isinstance(caught.value, ConfigError)


@pytest.mark.parametrize("ignore_term", ["0", "1"])
def test_a_cancel_stops_the_whole_process_group(monkeypatch, ignore_term):
    """KeyboardInterrupt (what a cancel raises) while relaying: the child and its grandchild are gone, the
    grandchild even when it ignores SIGTERM (SIGKILL after the grace period)."""
    monkeypatch.setattr(workers, "STOP_GRACE_S", 2.0)
    seen: dict[str, int] = {}

    def on_line(worker, line: str) -> None:
        if line.startswith("grandchild "):
            seen["grandchild"] = int(line.split()[1])
            raise KeyboardInterrupt

    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt), Supervisor(on_line=on_line) as supervisor:
        worker = supervisor.start("hanger", python_call(f"{CHILDREN}:hang_with_grandchild", ignore_term),
                                  env=child_env("cpu"))
        supervisor.relay()
    assert "grandchild" in seen
    assert worker.proc.returncode is not None  # reaped
    assert _gone(seen["grandchild"]), "the grandchild outlived the cancel"
    assert time.monotonic() - t0 < 60


def test_a_worker_with_nothing_left_is_stopped_and_is_no_failure():
    with Supervisor(on_line=lambda w, line: None) as supervisor:
        idle = supervisor.start("idle", python_call(f"{CHILDREN}:sleep", "300"), env=child_env("cpu"))
        busy = supervisor.start("busy", python_call(f"{CHILDREN}:sleep", "0.5"), env=child_env("cpu"))
        relay = supervisor.relay_in_background("test-relay")
        t0 = time.monotonic()
        supervisor.wait(relay, nothing_left=lambda w: w is idle, poll_s=0.1)
    assert time.monotonic() - t0 < 30 and idle.stopped and not busy.stopped
    assert idle.proc.returncode != 0 and busy.proc.returncode == 0
    supervisor.check()  # stopped on purpose: not a failure


def test_process_cache_loads_once_per_key_and_one_value_at_a_time():
    cache: ProcessCache[str] = ProcessCache("test")
    loads: list[str] = []

    def load(value: str):
        def run() -> str:
            time.sleep(0.05)  # threads asking at once must still load once
            loads.append(value)
            return value
        return run

    threads = [threading.Thread(target=lambda: cache.get("a", load("A"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loads == ["A"] and cache.get("a", load("X")) == "A" and cache.peek("a") == "A"
    assert cache.get("b", load("B")) == "B" and cache.peek("a") is None  # a new key replaces the value
    cache.clear()
    assert cache.peek("b") is None and cache.get("b", load("B2")) == "B2" and loads == ["A", "B", "B2"]
