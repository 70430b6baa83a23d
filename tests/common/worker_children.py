"""What the worker-layer tests run in real child processes (through tasks.common.worker_entry)."""
from __future__ import annotations

import json
import subprocess
import sys
import time

from data_contracts import errors

PREFIX = "@@test-event "


def talk(n: str) -> None:
    """Plain lines and events, one event behind another program's prefix (as accelerate's rank tags do),
    a prefixed line that is no JSON, and a line on stderr."""
    for i in range(int(n)):
        print(f"line {i}", flush=True)
        print(f"[rank0]: {PREFIX}{json.dumps({'i': i})}", flush=True)
    print(PREFIX + "{not json", flush=True)
    print("on stderr", file=sys.stderr, flush=True)


def give_up(kind: str, message: str) -> None:
    print("working on it", flush=True)
    raise getattr(errors, kind)(message)


def crash() -> None:
    print("about to fail", flush=True)
    raise ValueError("a bug, not a user error")


def hang_with_grandchild(ignore_term: str) -> None:
    """Start a grandchild (one that ignores SIGTERM when asked), say its pid, then hang."""
    code = "import signal, time\n"
    if ignore_term == "1":
        code += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    code += "print('ready', flush=True)\ntime.sleep(600)\n"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "ready"  # its handler is set
    print(f"grandchild {child.pid}", flush=True)
    time.sleep(600)


def sleep(seconds: str) -> None:
    time.sleep(float(seconds))
