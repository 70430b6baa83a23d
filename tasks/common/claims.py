"""Dynamic hand-out of planned work between processes of one machine: one O_EXCL file per piece.

Every participant walks the same plan in order and takes the next piece no one has claimed, so a process
that starts late or runs slow simply takes fewer. A claim file holds its taker's pid, so a participant
holding nothing can be told apart (and stopped rather than waited for).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def claim(claims: Path, index: int) -> bool:
    """Take piece `index` for this process; False when another participant has it (atomic O_EXCL create)."""
    try:
        fd = os.open(claims / f"shard-{index:05d}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    try:
        os.write(fd, str(os.getpid()).encode())
    finally:
        os.close(fd)
    return True


def claim_owners(claims: Path, indices: list[int]) -> set[int] | None:
    """The pids holding these pieces; None while any is still free (or its taker not yet written)."""
    owners = set()
    for index in indices:
        try:
            text = (claims / f"shard-{index:05d}").read_text().strip()
        except FileNotFoundError:
            return None
        if not text.isdigit():
            return None
        owners.add(int(text))
    return owners


ShardFn = Callable[[dict[str, Any]], dict[str, Any]]


def run_claimed(shards: list[dict[str, Any]], claims: Path, run: ShardFn,
                on_shard: Callable[[dict[str, Any]], None] = lambda s: None) -> list[dict[str, Any]]:
    """Run, in plan order, every shard this process manages to claim; return their summaries."""
    out = []
    for shard in shards:
        if claim(claims, int(shard["index"])):
            summary = run(shard)
            out.append(summary)
            on_shard(summary)
    return out
