"""Non-finite optimiser steps: the engine skips each one; `train.nan_tolerance` of them in a row stop the run
with a message that names the newest checkpoint known to be good."""
from __future__ import annotations

import logging
from pathlib import Path

from data_contracts.errors import StageError
from tasks.train.checkpoint import (
    PREFIX,
    TrainerState,
    checkpoint_root,
    latest_checkpoint,
)
from tasks.train.engine import StepOutcome

log = logging.getLogger("booruflow.train")


def count_outcome(state: TrainerState, out: StepOutcome, *, tolerance: int, work: Path) -> None:
    """Count a skipped step (after `state.step` was advanced past it); raise once too many came in a row."""
    if out.applied:
        state.consecutive_bad = 0
        return
    state.skipped_steps += 1
    state.consecutive_bad += 1
    log.warning("step %d: non-finite loss/gradients (loss %s, grad norm %s): update skipped",
                state.step, out.loss, out.grad_norm)
    if state.consecutive_bad >= tolerance:
        raise StageError(nan_stop_message(work, state.step, state.consecutive_bad, tolerance))


def checkpoint_step(path: Path) -> int | None:
    """The optimiser step a checkpoint folder (`step-00001000`) was saved after; None for other names."""
    digits = path.name.removeprefix(PREFIX)
    return int(digits) if path.name.startswith(PREFIX) and digits.isdigit() else None


def checkpoint_before(work: Path, step: int) -> Path | None:
    """The newest complete checkpoint saved before optimiser step `step` ran (its own step < `step`)."""
    found = [(n, p) for p in checkpoint_root(work).glob(f"{PREFIX}*")
             if (n := checkpoint_step(p)) is not None and n < step and (p / "trainer.json").is_file()]
    return max(found)[1] if found else None


def nan_stop_message(work: Path, step: int, bad_in_row: int, tolerance: int) -> str:
    """Why training stopped on `bad_in_row` non-finite steps ending at `step`. It names only a checkpoint
    saved before the first of them: one saved during the bad run came after the fault began, so it is newer
    but not known good (whatever caused the fault is in its state or its data position)."""
    first_bad = step - bad_in_row + 1
    good = checkpoint_before(work, first_bad)
    if good is not None:
        where = f"The newest checkpoint saved before the first non-finite step ({first_bad}) is {good}"
    else:
        newest = latest_checkpoint(work)
        after = f"; {newest} was saved after it" if newest is not None else ""
        where = (f"No checkpoint saved before the first non-finite step ({first_bad}) is left, so none is known "
                 f"good{after}")
    return (f"training stopped at step {step}: {bad_in_row} optimiser steps in a row had a non-finite loss or "
            f"gradient (train.nan_tolerance={tolerance}). {where}. Lower train.lr, use train.mixed_precision=bf16 "
            "instead of fp16, or check the cached latents")
