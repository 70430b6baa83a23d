"""Entry point of one training process under `accelerate launch`: `python -m tasks.train.worker <run.json>`.

Rank 0 prints progress events as `@@booruflow-train {json}` lines, which the launcher turns into progress
updates; a user-actionable failure exits with code 3 and its message on the last line.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from data_contracts.errors import BooruflowError

EXIT_USER_ERROR = 3


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tasks.train.worker <run.json>", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    from tasks.train.loop import RunSpec, print_event, run_training

    try:
        run_training(RunSpec.load(Path(args[0])), emit=print_event)
    except BooruflowError as exc:
        print(f"{type(exc).__name__}: {exc}", flush=True)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
