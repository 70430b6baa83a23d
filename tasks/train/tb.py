"""TensorBoard logs of a resumable run: `<work>/tb/`, one event file per attempt.

A killed attempt logged steps past its last checkpoint; the resumed attempt logs those steps again. Before a
(resumed) attempt opens its writer, `trim_events` rewrites the earlier attempts' event files into one file
that keeps only the points up to the resumed step (each (tag, step) once, original wall times), so
TensorBoard never shows a step twice. The rewrite is crash-safe: the new file is complete before it is
moved in, and the old files go only after that; a rewrite cut short is redone (deduplicated) next time.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

EVENTS_GLOB = "events.out.tfevents.*"
TRIM_DIR = ".tb-trim"  # sibling of tb/: TensorBoard would read a folder inside tb/ as another run


def event_files(folder: Path) -> list[Path]:
    """Event files in write order (their names start with the creation time, zero-padded)."""
    return sorted(p for p in Path(folder).glob(EVENTS_GLOB) if p.is_file())


def read_points(files: list[Path]) -> list:
    """Scalar/summary points of the files as single-value Events, the last write of each (tag, step)
    winning, in (step, wall time) order. Truncated tails (a kill mid-write) are skipped by the loader."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
    from tensorboard.compat.proto import event_pb2

    latest: dict[tuple[str, int], object] = {}
    for path in files:
        for event in LegacyEventFileLoader(str(path)).Load():
            if not event.HasField("summary"):
                continue  # file_version and session-log events: the new file writes its own
            for value in event.summary.value:
                one = event_pb2.Event(wall_time=event.wall_time, step=event.step)
                one.summary.value.add().CopyFrom(value)
                latest[(value.tag, event.step)] = one
    return sorted(latest.values(), key=lambda e: (e.step, e.wall_time))


def trim_events(folder: Path, keep_through: int) -> int:
    """Rewrite the event files under `folder` so only points with step <= keep_through remain, in one file.
    Returns the number of points kept."""
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    folder = Path(folder)
    old = event_files(folder)
    if not old:
        return 0
    kept = [e for e in read_points(old) if e.step <= keep_through]
    keep_name = None
    if kept:
        tmp = folder.parent / TRIM_DIR
        shutil.rmtree(tmp, ignore_errors=True)
        writer = EventFileWriter(str(tmp))
        for event in kept:
            writer.add_event(event)
        writer.close()
        (written,) = event_files(tmp)
        keep_name = written.name
        os.replace(written, folder / keep_name)  # complete before it appears in tb/
        shutil.rmtree(tmp, ignore_errors=True)
    for path in old:
        if path.name != keep_name:
            path.unlink(missing_ok=True)
    return len(kept)


def open_writer(folder: Path, resume_step: int):
    """A SummaryWriter for this attempt, after dropping what earlier attempts logged past `resume_step`."""
    from torch.utils.tensorboard import SummaryWriter

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    trim_events(folder, resume_step)
    return SummaryWriter(str(folder))
