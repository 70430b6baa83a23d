"""`python -m tasks.common.worker_entry <module>:<function> [args...]`: one worker process's main.

The function is imported and called with the string arguments; a BooruflowError it raises becomes the
exit code EXIT_USER_ERROR with `<Type>: <message>` as the last line (tasks/common/workers.py), which the
supervising parent turns back into the same error.
"""
from __future__ import annotations

import importlib
import sys

from tasks.common.workers import worker_exit


def main(argv: list[str]) -> int:
    if not argv or ":" not in argv[0]:
        print("usage: python -m tasks.common.worker_entry <module>:<function> [args...]", file=sys.stderr)
        return 2
    module, _, name = argv[0].partition(":")
    return worker_exit(lambda: getattr(importlib.import_module(module), name)(*argv[1:]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
