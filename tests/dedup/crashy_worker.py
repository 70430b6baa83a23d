"""A hash worker whose "decoder" kills the process on a file named *CRASH*, hangs on *HANG* and fails the
request on *ERROR* (tests of crash isolation and of stopping early)."""
from __future__ import annotations

import os
import time

from tasks.dedup import hashing

_real = hashing.hash_chunk


def _crashing(paths, fast=True, max_pixels=hashing.MAX_PIXELS):
    if any("CRASH" in p for p in paths):
        os._exit(11)  # as a segfaulting decoder would: no answer, no cleanup
    if any("HANG" in p for p in paths):
        time.sleep(600)  # a decoder stuck on a file
    if any("ERROR" in p for p in paths):
        raise RuntimeError("the worker itself failed")  # answered as {"error": ...}
    return _real(paths, fast, max_pixels)


if __name__ == "__main__":
    hashing.hash_chunk = _crashing
    hashing.worker_main()
