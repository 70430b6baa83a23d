"""The micro-batch stream: reader batches across epochs, prepared on a background thread.

Epochs chain without a gap (an accumulation window may span an epoch boundary), so every optimiser step
sees exactly `grad_accum` micro-batches. Each prepared batch carries the reader's state right after it, so a
checkpoint can record exactly where the next batch starts.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, Iterator

from data_contracts.errors import StageError
from tasks.train.batches import StepBatch

_DONE = object()


def epoch_stream(reader, start_epoch: int, reader_state: Any = None) -> Iterator[tuple[int, dict, Any]]:
    """(epoch, batch, reader state after it), forever; resumes inside `start_epoch` from `reader_state`."""
    epoch = start_epoch
    reader.set_epoch(epoch)
    if reader_state is not None:
        reader.load_state_dict(reader_state)
    empty = 0
    while True:
        got = False
        for batch in reader:
            got = True
            yield epoch, batch, reader.state_dict()
        empty = 0 if got else empty + 1
        if empty >= 2:
            raise StageError("the cache yields no batch in an epoch: fewer samples than train.batch_size per "
                             "process in every bucket? Lower train.batch_size or cache more data")
        epoch += 1
        reader.set_epoch(epoch)


class Prefetcher:
    """Runs `prepare(epoch, batch, state) -> StepBatch` on a thread, `depth` batches ahead.

    `next()` returns (batch, seconds waited) — the wait is the data-wait the loop reports.
    """

    def __init__(self, source: Iterator[tuple[int, dict, Any]], prepare: Callable[[int, dict, Any], StepBatch],
                 depth: int = 4) -> None:
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._source = source
        self._prepare = prepare
        self._thread = threading.Thread(target=self._run, name="train-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for epoch, batch, state in self._source:
                item = self._prepare(epoch, batch, state)
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._q.put(_DONE)
        except BaseException as exc:  # surfaced in the training thread
            self._q.put(exc)

    def next(self) -> tuple[StepBatch, float]:
        t0 = time.perf_counter()
        item = self._q.get()
        waited = time.perf_counter() - t0
        if isinstance(item, BaseException):
            raise item
        if item is _DONE:
            raise StopIteration
        return item, waited

    def close(self) -> None:
        self._stop.set()
        try:
            while True:
                self._q.get_nowait()
        except queue.Empty:
            pass
        self._thread.join(timeout=5)
