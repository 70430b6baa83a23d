"""What a worker process keeps between the shards it runs: a model loaded once, a table read once.

A Dask/Ray worker or a shard worker runs many shards of one stage run; loading the model per shard would
cost more than the shard. Each cache holds one value under the key that decides it (the stage's
fingerprint, the files read): a new key replaces the value, so a process never holds two models.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")
_NOTHING = object()


class ProcessCache(Generic[V]):
    def __init__(self, what: str) -> None:
        self.what = what  # for people reading a debugger or a test
        self._lock = threading.Lock()  # shards of one process may run in threads
        self._key: object = _NOTHING
        self._value: V | None = None

    def get(self, key: Hashable, load: Callable[[], V], valid: Callable[[V], bool] | None = None) -> V:
        """The value kept under `key`, loading it (once, whatever the threads) when the key is new, or when
        `valid` says the kept value no longer holds (a folder it names was deleted, say)."""
        with self._lock:
            if self._key != key or (valid is not None and not valid(self._value)):  # type: ignore[arg-type]
                self._key, self._value = _NOTHING, None  # let the old value go before loading its successor
                self._value = load()
                self._key = key
            return self._value  # type: ignore[return-value]

    def peek(self, key: Hashable) -> V | None:
        """The value kept under `key`, or None: never loads."""
        with self._lock:
            return self._value if self._key == key else None

    def clear(self) -> None:
        """Forget the value (the stage is done with it; a test plays a fresh process)."""
        with self._lock:
            self._key, self._value = _NOTHING, None
