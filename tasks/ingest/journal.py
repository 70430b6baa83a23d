"""Append-only JSON Lines journals that survive `kill -9` at any byte.

A record is one line, written with a single write() and flushed (the OS keeps it across a process kill;
`sync=True` also fsyncs, for records that are expensive to redo such as a crawled page). On open, a torn
last line (the kill hit mid-write) is cut off, so the next append starts on a clean line.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator


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
