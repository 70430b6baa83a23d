"""A hash worker whose "decoder" kills the process on any file named *CRASH* (tests of crash isolation)."""
from __future__ import annotations

import os

from tasks.dedup import hashing

_real = hashing.hash_chunk


def _crashing(paths, fast=True, max_pixels=hashing.MAX_PIXELS):
    if any("CRASH" in p for p in paths):
        os._exit(11)  # as a segfaulting decoder would: no answer, no cleanup
    return _real(paths, fast, max_pixels)


if __name__ == "__main__":
    hashing.hash_chunk = _crashing
    hashing.worker_main()
