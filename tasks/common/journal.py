"""The one journal format of the house: append-only JSON Lines that survive `kill -9` at any byte.

A record is one line, written with a single write() and flushed (the OS keeps it across a process kill;
`sync=True` also fsyncs, for records that are expensive to redo such as a crawled page or a written chunk).
On open, a torn last line (the kill hit mid-write) is cut off, so the next append starts on a clean line;
a reader (`read_records`) stops before a torn line, so it may read a journal another process is writing.

Every resumable stage uses it the same way: a unit of work (a crawled page, a downloaded post, a cache
chunk) is made durable first (temp + rename, fsync), and only then journaled; a record whose unit is
missing does not count. A shard run by a worker (maybe on another machine) ends with its done mark
(`write_done_mark`), published after every file the shard wrote, so whoever sees the mark sees the files.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

from data_contracts.store import atomic_write_text


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()
        self._fh = open(path, "ab")

    def _repair(self) -> None:
        """Truncate after the last complete, parseable line."""
        if not self.path.exists():
            return
        good = 0
        with open(self.path, "rb") as fh:
            offset = 0
            for line in fh:
                offset += len(line)
                if not line.endswith(b"\n"):
                    break
                try:
                    json.loads(line)
                except ValueError:
                    break
                good = offset
        if good != self.path.stat().st_size:
            with open(self.path, "r+b") as fh:
                fh.truncate(good)

    def records(self) -> Iterator[dict[str, Any]]:
        """Every complete record, in write order (streamed: journals can be large)."""
        self._fh.flush()
        with open(self.path, "rb") as fh:
            for line in fh:
                if line.strip():
                    yield json.loads(line)

    def append(self, record: dict[str, Any], sync: bool = False) -> None:
        self._fh.write(json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode() + b"\n")
        self._fh.flush()
        if sync:
            os.fsync(self._fh.fileno())

    def sync(self) -> None:
        """fsync everything appended so far."""
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """The complete records of a journal another process may still be appending to (read-only): a torn or
    unparseable last line (its writer was killed mid-record) ends the read."""
    if not path.exists():
        return
    with open(path, "rb") as fh:
        for line in fh:
            if not line.endswith(b"\n"):
                return
            if line.strip():
                try:
                    yield json.loads(line)
                except ValueError:
                    return


def write_done_mark(ctx: Any, mark_rel: str, summary: dict[str, Any], files: Iterable[str]) -> None:
    """Mark a shard done: its summary written atomically, then its `files` and the mark published through
    the stage's store (the mark last: a reader on another machine that sees it finds the files too)."""
    atomic_write_text(ctx.work / mark_rel, json.dumps(summary))
    publish_done(ctx, mark_rel, files)


def publish_done(ctx: Any, mark_rel: str, files: Iterable[str]) -> None:
    """(Re)publish a done shard's files, then its mark (a kill may have come between the mark and its upload)."""
    for rel in (*files, mark_rel):
        ctx.store.work_put(ctx.stage, ctx.fingerprint, rel)


def read_done_mark(ctx: Any, mark_rel: str, files: Iterable[str] = (), refresh: bool = False) -> dict[str, Any] | None:
    """A shard's summary when its mark and every one of its `files` are here or on the store, else None."""
    mark = ctx.store.work_get(ctx.stage, ctx.fingerprint, mark_rel, refresh=refresh)
    if mark is None:
        return None
    if any(ctx.store.work_get(ctx.stage, ctx.fingerprint, rel, refresh=refresh) is None for rel in files):
        return None
    return json.loads(mark.read_text())
