"""What the loop does after an optimiser step, one named hook each: the step line, the history row, the
validation loss, the sample grid, the epoch export and the checkpoint.

`after_step` hooks are the caller's (`run_training(after_step=...)`): the worker registers `kill_after`
when a test asks for a kill (tasks/train/worker.py), so no test code runs in the loop itself.
"""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import torch

from tasks.train.checkpoint import TrainerState, save_checkpoint
from tasks.train.engine import StepOutcome
from tasks.train.export import epoch_export_due
from tasks.train.logs import Window
from tasks.train.parts import TrainParts
from tasks.train.previews import sample_grid, validation

AfterStep = Callable[[TrainerState], None]


def due(step: int, every: int, final: bool) -> bool:
    """Every `every` optimiser steps (0: never) and after the last one."""
    return final or (every > 0 and step % every == 0)


def _lr(p: TrainParts) -> float:
    return p.engine.scheduler.get_last_lr()[0]


def say_step(p: TrainParts, out: StepOutcome) -> None:
    """A step line for the log, when StepTalk says one is due (rank 0)."""
    s, talk = p.state, p.log.talk
    if talk is not None and (line := talk.update(s.step, s.micro_batches, p.cfg.grad_accum, out.loss, _lr(p),
                                                 s.samples_seen)):
        p.log.emit(line)


def log_row(p: TrainParts, out: StepOutcome, window: Window) -> None:
    """The history row closing `window` (history.jsonl, TensorBoard, wandb) and the launcher's progress."""
    s = p.state
    dt = time.perf_counter() - window.t0 - window.extra  # training time only
    row: dict[str, Any] = {"step": s.step, "epoch": s.epoch, "loss": out.loss, "lr": _lr(p),
                           "grad_norm": out.grad_norm, "samples_per_s": window.samples / dt if dt > 0 else 0.0,
                           "data_wait_frac": window.wait / dt if dt > 0 else 0.0, "skipped_steps": s.skipped_steps}
    if p.acc.device.type == "cuda":
        row["gpu_mem_gib"] = torch.cuda.max_memory_allocated(p.acc.device) / 2**30
    p.log.row(row)
    p.log.emit({"event": "progress", "fraction": s.step / p.total, **row, "total_steps": p.total})


def validate(p: TrainParts) -> dict[str, float]:
    """The held-out loss (rank 0), logged as its own history row."""
    val = validation(p)
    p.log.row({"step": p.state.step, "epoch": p.state.epoch, **val})
    return val


def sample(p: TrainParts) -> None:
    """A sample grid (every rank takes part; rank 0 renders it and says where it is)."""
    path = sample_grid(p, p.state.step)
    if path:
        p.log.emit({"event": "samples", "step": p.state.step, "path": path})


def export_epoch(p: TrainParts, final: bool) -> None:
    """A single-file export when this step ended an epoch it is due for (rank 0); the last epoch's is the
    final export."""
    s, cfg = p.state, p.cfg
    epoch = epoch_export_due(s.micro_batches, cfg.grad_accum, p.steps_per_epoch, cfg.export_every_epochs)
    if p.acc.is_main_process and epoch is not None and not final:
        p.exporter.epoch(s, epoch)


def checkpoint(p: TrainParts, reader_state: Any) -> None:
    """A checkpoint (every rank): resuming from it goes on with the batch after `reader_state`."""
    m = p.models
    save_checkpoint(p.work, p.acc, p.state, unet=m.unet, optimizer=p.engine.optimizer,
                    scheduler=p.engine.scheduler, reader_state=reader_state,
                    text_encoder=m.text_encoder if p.cfg.train_text_encoder else None, ema=m.ema,
                    keep_last=p.cfg.keep_last)


def kill_after(step: int) -> AfterStep:
    """Fault injection for the kill/resume tests: SIGKILL this process right after optimiser step `step`."""
    def kill(state: TrainerState) -> None:
        if state.step == step:
            os.kill(os.getpid(), signal.SIGKILL)

    return kill
