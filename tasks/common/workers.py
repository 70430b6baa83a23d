"""Supervised worker processes: the one way a stage starts processes beside itself.

Tag's shard workers, cache's further GPUs and `accelerate launch` for training all go through here:
- `child_env`: this repo importable, unbuffered output, and the GPUs the child may see;
- `Supervisor.start`: the child in a session (process group) of its own, stdout and stderr merged;
- `Supervisor.relay`: each line to `on_line`, an event line (`<prefix>{json}` anywhere in the line) to
  `on_event`;
- `worker_exit` (child side) / `Supervisor.check` (parent side): an error a user can act on leaves the child
  with EXIT_USER_ERROR and `<ErrorType>: <message>` as a line; the parent raises the same type with that
  message, and any other non-zero exit as a StageError with the child's last lines;
- `Supervisor.stop` and the `with` block: a child's whole process group is stopped when the parent is
  cancelled (Prefect's TerminationSignal, KeyboardInterrupt) or fails, so no orphan keeps a GPU.
"""
from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from data_contracts.errors import BooruflowError, ConfigError, ContractError, StageError

REPO_ROOT = Path(__file__).resolve().parents[2]
EXIT_USER_ERROR = 3  # a BooruflowError inside the child; its `<Type>: <message>` line says which
USER_ERRORS: dict[str, type[BooruflowError]] = {
    cls.__name__: cls for cls in (BooruflowError, ConfigError, ContractError, StageError)}
TAIL_LINES = 30  # the child's last lines quoted when it dies of something else
STOP_GRACE_S = 30.0  # SIGTERM first (a worker may finish its journal line), SIGKILL after this


def visible_gpu_ids() -> list[str]:
    """CUDA device ids this process may use, as CUDA_VISIBLE_DEVICES would name them to a child."""
    import torch

    if not torch.cuda.is_available():
        return []
    n = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None and listed.strip():
        ids = [x.strip() for x in listed.split(",") if x.strip()]
        return ids[:n]
    return [str(i) for i in range(n)]


def child_env(devices: str | None = None, base: Mapping[str, str] | None = None,
              **extra: str) -> dict[str, str]:
    """The environment of a worker process. `devices`: what it may see as CUDA_VISIBLE_DEVICES ("cpu" or ""
    for no GPU at all, so "cuda" can never mean someone else's card); None leaves the variable as it is
    (accelerate hands GPUs out itself). `extra` only fills variables the environment does not set."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")  # lines reach the relay as they are printed
    for key, value in extra.items():
        env.setdefault(key, value)
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = "" if devices == "cpu" else devices
    return env


# --- the child side ------------------------------------------------------------------------------
def user_error_line(exc: BooruflowError) -> str:
    return f"{type(exc).__name__}: {exc}"


def worker_exit(main: Callable[[], object]) -> int:
    """Run a worker's main; its exit code: 0, or EXIT_USER_ERROR with the error's line printed last."""
    try:
        main()
    except BooruflowError as exc:
        print(user_error_line(exc), flush=True)
        return EXIT_USER_ERROR
    return 0


def parse_user_error(line: str) -> tuple[type[BooruflowError], str] | None:
    """(error type, message) of a `<Type>: <message>` line a worker printed as it gave up, else None."""
    name, sep, message = line.partition(": ")
    return (USER_ERRORS[name], message) if sep and name in USER_ERRORS else None


# --- the parent side -----------------------------------------------------------------------------
@dataclass
class Worker:
    """One supervised child: its process, its last lines and the last user error it printed."""

    name: str  # how messages name it ("tag worker on gpu1", "training processes")
    label: str  # short, for relayed lines ("gpu1")
    proc: subprocess.Popen[str]
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    user_error: str | None = None  # the last `<Type>: <message>` line: an accelerate traceback may follow it
    stopped: bool = False  # stopped on purpose: its exit is no failure

    @property
    def pid(self) -> int:
        return self.proc.pid


LineFn = Callable[[Worker, str], None]
EventFn = Callable[[Worker, dict], None]


def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def stop_groups(procs: list[subprocess.Popen], grace_s: float | None = None) -> None:
    """SIGTERM each child's process group (all at once: a cancel should not wait worker after worker),
    SIGKILL whatever of them is left after `grace_s` (default STOP_GRACE_S), grandchildren too (accelerate's
    training processes outlive their launcher for a moment)."""
    deadline = time.monotonic() + (STOP_GRACE_S if grace_s is None else grace_s)
    live = [p for p in procs if _signal_group(p.pid, signal.SIGTERM)]
    for proc in live:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        while _signal_group(proc.pid, 0) and time.monotonic() < deadline:
            time.sleep(0.05)
        _signal_group(proc.pid, signal.SIGKILL)
    for proc in procs:
        proc.wait()


class Supervisor:
    """The worker processes of one call. Use as a `with` block: leaving it by an exception (a failure here,
    a cancel) stops every worker's process group before the exception goes on."""

    def __init__(self, *, on_line: LineFn, on_event: EventFn | None = None, event_prefix: str | None = None):
        self.workers: list[Worker] = []
        self._on_line = on_line
        self._on_event = on_event
        self._prefix = event_prefix

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is not None:
            self.stop_all()

    def start(self, name: str, cmd: list[str], *, env: dict[str, str], label: str = "") -> Worker:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env=env, cwd=str(REPO_ROOT), start_new_session=True)
        worker = Worker(name, label or name, proc)
        self.workers.append(worker)
        return worker

    def relay(self) -> None:
        """Forward every worker's lines until all have closed their output, then reap them."""
        sel = selectors.DefaultSelector()
        for worker in self.workers:
            sel.register(worker.proc.stdout, selectors.EVENT_READ, worker)  # type: ignore[arg-type]
        open_streams = len(self.workers)
        while open_streams:
            for key, _ in sel.select(timeout=1.0):
                line = key.fileobj.readline()  # type: ignore[union-attr]
                if not line:
                    sel.unregister(key.fileobj)
                    open_streams -= 1
                    continue
                self._line(key.data, line.rstrip("\n"))
        sel.close()
        for worker in self.workers:
            worker.proc.wait()

    def relay_in_background(self, name: str) -> threading.Thread:
        thread = threading.Thread(target=self.relay, name=name, daemon=True)
        thread.start()
        return thread

    def _line(self, worker: Worker, line: str) -> None:
        marker = line.find(self._prefix) if self._prefix and self._on_event else -1
        if marker >= 0:
            try:
                event = json.loads(line[marker + len(self._prefix):])  # type: ignore[arg-type]
            except json.JSONDecodeError:
                pass  # not an event after all: an ordinary line
            else:
                self._on_event(worker, event)  # type: ignore[misc]
                return
        if parse_user_error(line):
            worker.user_error = line
        worker.tail.append(line)
        self._on_line(worker, line)

    def wait(self, relay: threading.Thread, nothing_left: Callable[[Worker], bool] | None = None,
             poll_s: float = 0.5) -> None:
        """Wait for the background relay to end; every `poll_s`, a running worker for which `nothing_left`
        says so (every piece of work taken by others while it was still starting up) is stopped rather
        than waited for."""
        while relay.is_alive():
            relay.join(poll_s)
            if nothing_left is None:
                continue
            for worker in self.workers:
                if worker.proc.poll() is None and not worker.stopped and nothing_left(worker):
                    self.stop(worker)

    def stop(self, worker: Worker) -> None:
        worker.stopped = True
        stop_groups([worker.proc])

    def stop_all(self) -> None:
        stop_groups([w.proc for w in self.workers])

    def failed(self) -> list[Worker]:
        """Workers that exited non-zero (and were not stopped on purpose), in start order."""
        return [w for w in self.workers if w.proc.returncode not in (0, None) and not w.stopped]

    def check(self, user_error: str = "{name}: {message}") -> None:
        """Raise for the first failed worker: its own error type (`user_error` formats the message) when it
        gave up with one, else a StageError quoting its exit code and last lines."""
        for worker in self.failed():
            parsed = parse_user_error(worker.user_error) if worker.user_error else None
            if parsed is not None:
                kind, message = parsed
                raise kind(user_error.format(name=worker.name, message=message))
            raise StageError(f"{worker.name} exited with code {worker.proc.returncode}; last output:\n"
                             + "\n".join(worker.tail))


def python_call(target: str, *args: str) -> list[str]:
    """The command that runs `module:function(*args)` as a worker with this interpreter (see worker_entry)."""
    return [sys.executable, "-m", "tasks.common.worker_entry", target, *args]
