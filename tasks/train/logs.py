"""What rank 0 reports while training: history.jsonl, TensorBoard, wandb, progress events and step lines.

Other ranks get a RunLog that writes nothing, so the loop calls it the same way on every rank.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_contracts.errors import ConfigError
from data_contracts.store import atomic_write_text
from pipeline_config.train import TrainConfig

HISTORY_JSONL = "history.jsonl"
# Seconds between two step lines in the log (besides the first step, each epoch end and the last step).
TALK_ENV = "BOORUFLOW_TRAIN_LOG_EVERY_S"
TALK_EVERY_S = 30.0

Emit = Callable[[dict[str, Any]], None]


class StepTalk:
    """When training says a step line, and what it says: the first optimiser step (this run or after a
    resume), then every `every_s` seconds, each epoch end and the last step. The loss is smoothed (bias-
    corrected EMA, as TensorBoard does); samples/s is over the span since the previous line; the ETA is the
    pace since the first step (so compile and model loading do not inflate it) times the steps left."""

    def __init__(self, total: int, start_step: int, steps_per_epoch: int, grad_accum: int, every_s: float,
                 start_samples: int = 0, clock: Callable[[], float] = time.monotonic, beta: float = 0.9) -> None:
        self.total, self.start_step, self.spe, self.every_s = total, start_step, max(1, steps_per_epoch), every_s
        self.start_samples = start_samples
        self.epochs = max(1, math.ceil(total * grad_accum / self.spe))
        self.clock, self.beta = clock, beta
        self.t0 = clock()
        self.t_first: float | None = None
        self.first_step = start_step
        self.last_t, self.last_samples = self.t0, None
        self.ema, self.ema_n = 0.0, 0

    def update(self, step: int, micro_batches: int, grad_accum: int, loss: float, lr: float,
               samples_seen: int) -> dict[str, Any] | None:
        """Called after every optimiser step; the `step` event to emit, or None."""
        now = self.clock()
        if math.isfinite(loss):
            self.ema, self.ema_n = self.beta * self.ema + (1 - self.beta) * loss, self.ema_n + 1
        first = self.t_first is None
        if first:
            self.t_first, self.first_step = now, step
        epoch_end = micro_batches // self.spe > (micro_batches - grad_accum) // self.spe
        final = step >= self.total
        if not (first or final or epoch_end or now - self.last_t >= self.every_s):
            return None
        span, done = now - self.last_t, samples_seen - (self.start_samples if self.last_samples is None
                                                         else self.last_samples)
        pace = ((now - self.t_first) / (step - self.first_step) if step > self.first_step
                else (now - self.t0) / max(1, step - self.start_step))
        smoothed = self.ema / (1 - self.beta ** self.ema_n) if self.ema_n else float("nan")
        self.last_t, self.last_samples = now, samples_seen
        return {"event": "step", "step": step, "total_steps": self.total,
                "epoch": min(self.epochs, (micro_batches - 1) // self.spe + 1), "epochs": self.epochs,
                "epoch_end": epoch_end, "loss": loss, "loss_smoothed": smoothed, "lr": lr,
                "samples_per_s": done / span if span > 0 else None,
                "elapsed_s": now - self.t0, "eta_s": max(0.0, (self.total - step) * pace)}


class History:
    """history.jsonl on rank 0 (append + fsync per row); resumed runs drop rows past the checkpoint."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        rows = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if row["step"] <= resume_step:
                    rows.append(row)
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        self.rows = rows

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


@dataclass
class Window:
    """The span since the last history row. Its samples/s and data-wait fraction are over training time only:
    `extra` is the time spent validating, sampling, exporting and checkpointing in it."""

    t0: float = field(default_factory=time.perf_counter)
    wait: float = 0.0
    extra: float = 0.0
    samples: int = 0


class RunLog:
    """Rows go to history.jsonl, TensorBoard and wandb; events to the launcher (a no-op off rank 0)."""

    def __init__(self, emit: Emit, history: History | None = None, tb: Any = None, wandb: bool = False,
                 talk: StepTalk | None = None) -> None:
        self.emit, self.history, self.tb, self.wandb, self.talk = emit, history, tb, wandb, talk

    def row(self, row: dict[str, Any]) -> None:
        if self.history is None:
            return
        self.history.append(row)
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"train/{k}" if not k.startswith("val") else f"val/{k}", v, row["step"])
            self.tb.flush()
        if self.wandb:
            import wandb

            wandb.log(row, step=row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def open_run_log(cfg: TrainConfig, work: Path, *, resume_step: int, samples_seen: int, total: int,
                 steps_per_epoch: int, main: bool, emit: Emit) -> RunLog:
    """Rank 0's log, picking up from the checkpoint at `resume_step`; an empty one elsewhere."""
    if not main:
        return RunLog(emit)
    history = History(work / HISTORY_JSONL, resume_step)
    tb = None
    if cfg.logging.tensorboard:
        from tasks.train.tb import open_writer

        # Killed attempts logged steps past the checkpoint: drop them, or TensorBoard shows them twice.
        tb = open_writer(work / "tb", resume_step)
    if cfg.logging.wandb:
        _wandb_init(cfg, work)
    talk = StepTalk(total, resume_step, steps_per_epoch, cfg.grad_accum,
                    float(os.environ.get(TALK_ENV) or TALK_EVERY_S), samples_seen)
    return RunLog(emit, history, tb, cfg.logging.wandb, talk)


def _wandb_init(cfg: TrainConfig, work: Path) -> None:
    try:
        import wandb
    except ImportError as exc:
        raise ConfigError("train.logging.wandb=true needs the wandb package (pip install wandb), "
                          "or set train.logging.wandb=false") from exc
    # A stable run id per work folder: a resumed run continues the same wandb run.
    wandb.init(project=cfg.logging.wandb_project, id=f"booruflow-{work.name}", resume="allow",
               dir=str(work), config=cfg.model_dump(mode="json"))
