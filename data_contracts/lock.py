"""One run at a time per stage and data root: a lock that says who holds it.

Two runs of the same stage on one data root (two `fm run`, a served deployment and a CLI run, two hosts on one
bucket) would otherwise build into the same work folder, clean each other's work and race their commits. The
orchestration (run_stage, the flow) holds the stage's lock from preparing the stage to its commit; a second
run waits, logging who holds it, and then usually finds the output complete (cached).

- Local data root: `fcntl.flock` on `<root>/<stage>/.lock`. The kernel drops the lock when its process dies
  (kill -9 included), so a stale lock cannot exist; the file's text names the holder for the waiting run.
- Object storage: a lease object `<root>/<stage>/_lock.json` (owner, token, heartbeat). The holder rewrites
  its heartbeat every `heartbeat_s`; a lease whose heartbeat is older than `stale_after_s` (a killed holder)
  is taken over. Object stores have no atomic create here, so a taker writes its token, waits `settle_s` and
  reads it back: of two runs that write at the same moment, the one whose token survives holds the lease.
  Clocks of the hosts are assumed to agree to well within `stale_after_s`.

Re-entrant within a thread: a stage this thread already holds is not locked again (other threads of the same
process wait like any other run).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from data_contracts.errors import StageError

LOCAL_NAME = ".lock"
REMOTE_NAME = "_lock.json"

_HELD: dict[tuple[str, str, int], int] = {}  # (root url, stage, thread) -> nesting depth
_HELD_LOCK = threading.Lock()


def owner_info(note: str = "") -> dict[str, Any]:
    """Who is asking: shown to a run that has to wait."""
    command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:200]
    return {"host": socket.gethostname(), "pid": os.getpid(), "command": command, "note": note,
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def describe(info: dict[str, Any] | None) -> str:
    if not info:
        return "another run (no owner recorded)"
    since = info.get("since", "?")
    try:
        age = time.time() - datetime.fromisoformat(since).timestamp()
        since = f"{since} ({age:.0f} s ago)"
    except (TypeError, ValueError):
        pass
    note = f", {info['note']}" if info.get("note") else ""
    return f"{info.get('host', '?')} pid {info.get('pid', '?')} (`{info.get('command', '?')}`{note}) since {since}"


class StageLock:
    """`with StageLock(store, "ingest", log=log):` — exclusive use of one stage of one data root."""

    def __init__(self, store: Any, stage: str, *, log: logging.Logger | None = None, note: str = "",
                 wait_s: float | None = None, poll_s: float = 0.5, report_every_s: float = 30.0,
                 stale_after_s: float = 120.0, heartbeat_s: float = 15.0, settle_s: float = 1.0,
                 clock: Callable[[], float] = time.time) -> None:
        """wait_s: how long to wait for another holder (None = as long as it takes, 0 = not at all)."""
        self.store, self.stage, self.note = store, stage, note
        self.log = log or logging.getLogger(f"booruflow.{stage}")
        self.wait_s, self.poll_s, self.report_every_s = wait_s, poll_s, report_every_s
        self.stale_after_s, self.heartbeat_s, self.settle_s = stale_after_s, heartbeat_s, settle_s
        self.clock = clock
        self.key = (store.root_url, stage, 0)  # the thread is the one that acquires
        self._fh: Any = None
        self._token: str | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._nested = False

    @property
    def where(self) -> str:
        return f"{self.store.root_url}/{self.stage}"

    # --- the two kinds of store ----------------------------------------------------------------------------
    def _local_path(self) -> Path:
        return Path(self.store.output_path(self.stage, LOCAL_NAME))

    def _try_local(self) -> tuple[bool, dict[str, Any] | None]:
        import fcntl

        path = self._local_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            text = fh.read()
            fh.close()
            try:
                return False, json.loads(text) if text.strip() else None
            except ValueError:
                return False, None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(owner_info(self.note)))
        fh.flush()
        self._fh = fh
        return True, None

    def _remote_path(self) -> str:
        return self.store.output_path(self.stage, REMOTE_NAME)

    def _read_remote(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.store.fs.cat_file(self._remote_path()))
        except (FileNotFoundError, ValueError):
            return None

    def _write_remote(self, lease: dict[str, Any]) -> None:
        with self.store.fs.open(self._remote_path(), "w") as fh:
            fh.write(json.dumps(lease))

    def _try_remote(self) -> tuple[bool, dict[str, Any] | None]:
        lease = self._read_remote()
        if lease is not None and self.clock() - float(lease.get("heartbeat", 0)) < self.stale_after_s:
            return False, lease
        if lease is not None:
            self.log.warning("%s: taking over the lease of %s: no heartbeat for %.0f s", self.where,
                             describe(lease), self.clock() - float(lease.get("heartbeat", 0)))
        token = uuid.uuid4().hex
        self._write_remote({**owner_info(self.note), "token": token, "heartbeat": self.clock()})
        time.sleep(self.settle_s)  # a run that wrote at the same moment: the last write wins, both read it back
        lease = self._read_remote()
        if lease is None or lease.get("token") != token:
            return False, lease
        self._token = token
        self._beat = threading.Thread(target=self._heartbeat, name=f"lease-{self.stage}", daemon=True)
        self._beat.start()
        return True, None

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            lease = self._read_remote()
            if lease is None or lease.get("token") != self._token:
                self.log.error("%s: the lease was taken by %s while this run held it", self.where, describe(lease))
                return
            self._write_remote({**lease, "heartbeat": self.clock()})

    # --- acquire / release -----------------------------------------------------------------------------------
    def acquire(self) -> "StageLock":
        self.key = (self.store.root_url, self.stage, threading.get_ident())
        with _HELD_LOCK:
            if _HELD.get(self.key):
                _HELD[self.key] += 1
                self._nested = True
                return self
        started = time.monotonic()
        reported = float("-inf")
        try_once = self._try_local if self.store.is_local else self._try_remote
        while True:
            ok, holder = try_once()
            if ok:
                break
            waited = time.monotonic() - started
            if self.wait_s is not None and waited >= self.wait_s:
                raise StageError(f"{self.where} is locked by {describe(holder)}; wait for that run to finish "
                                 "(or stop it) and run again")
            if waited - reported >= self.report_every_s:
                self.log.info("%s: waiting for the stage lock held by %s", self.where, describe(holder))
                reported = waited
            time.sleep(self.poll_s)
        if time.monotonic() - started > self.poll_s:
            self.log.info("%s: got the stage lock after %.0f s", self.where, time.monotonic() - started)
        with _HELD_LOCK:
            _HELD[self.key] = 1
        return self

    def release(self) -> None:
        with _HELD_LOCK:
            depth = _HELD.get(self.key, 0)
            if self._nested or depth > 1:
                _HELD[self.key] = max(0, depth - 1)
                return
            _HELD.pop(self.key, None)
        if self._fh is not None:
            self._fh.close()  # closing drops the flock; the holder text stays for nobody to trust
            self._fh = None
        if self._token is not None:
            self._stop.set()
            if self._beat is not None:
                self._beat.join(timeout=5)
            lease = self._read_remote()
            if lease is not None and lease.get("token") == self._token:
                self.store.fs.rm(self._remote_path())
            self._token = None

    def __enter__(self) -> "StageLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
