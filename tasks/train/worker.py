"""Entry point of one training process under `accelerate launch`: `python -m tasks.train.worker <run.json>`.

Rank 0 prints progress events as `@@booruflow-train {json}` lines, which the launcher turns into progress
updates; a user-actionable failure exits with EXIT_USER_ERROR and its message on the last line
(tasks/common/workers.py, which the launcher's supervisor reads back).
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from tasks.common.workers import worker_exit

# Fault injection for the kill/resume tests: SIGKILL the worker right after the given optimiser step.
KILL_ENV = "BOORUFLOW_TRAIN_KILL_AT_STEP"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tasks.train.worker <run.json>", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    from tasks.train.hooks import kill_after
    from tasks.train.loop import RunSpec, print_event, run_training

    kill_at = int(os.environ.get(KILL_ENV) or 0)
    after_step = [kill_after(kill_at)] if kill_at else []
    return worker_exit(lambda: run_training(RunSpec.load(Path(args[0])), emit=print_event, after_step=after_step))


if __name__ == "__main__":
    sys.exit(main())
