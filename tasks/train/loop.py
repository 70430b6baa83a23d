"""The training run of one process (naifu-style: parts built once, then a short loop with named hooks).

`run_training(spec)` is what every process runs: in-process for one GPU/CPU, or under `accelerate launch`
(tasks/train/worker.py) for several. Rank 0 writes the history, TensorBoard logs, samples, validation
numbers, the export and `result.json`; every rank takes part in checkpoints.

parts.py builds what the loop needs (TrainParts), hooks.py holds what it does after a step, finish.py
the final export and result.
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from data_contracts.store import atomic_write_text
from pipeline_config.train import TrainConfig
from tasks.train import hooks
from tasks.train.finish import RESULT_NAME, finish
from tasks.train.guard import count_outcome
from tasks.train.hooks import AfterStep, due
from tasks.train.logs import HISTORY_JSONL, Emit, Window
from tasks.train.parts import TrainParts, build_parts

__all__ = ["EVENT_PREFIX", "HISTORY_JSONL", "RESULT_NAME", "RunSpec", "print_event", "run_training", "train",
           "use_cpu"]

EVENT_PREFIX = "@@booruflow-train "


@dataclass
class RunSpec:
    """Everything a training process needs; JSON-serialisable (written to <work>/run.json)."""

    train: dict[str, Any]  # TrainConfig as JSON
    work: str  # the stage's work folder (checkpoints, logs, outputs)
    data_root: str
    local_cache: str
    cache_fingerprint: str
    model_cache_dir: str  # runtime.cache_dir: built tiny models, tokenizer
    device: str = "auto"  # auto | cpu | cuda

    def save(self, path: Path) -> None:
        """`work` is written as "." when it is the file's own folder: the train stage's run.json lives in its
        work folder, which the commit renames into the output, so an absolute path would name a deleted folder."""
        data = asdict(self)
        if Path(self.work).resolve() == Path(path).resolve().parent:
            data["work"] = "."
        atomic_write_text(path, json.dumps(data, indent=1))

    @classmethod
    def load(cls, path: Path) -> RunSpec:
        """A relative `work` is relative to the file's folder (wherever that folder is now)."""
        path = Path(path).absolute()
        data = json.loads(path.read_text())
        data["work"] = str(path.parent / data["work"])  # an absolute one stays as it is
        return cls(**data)


def print_event(event: dict[str, Any]) -> None:
    print(EVENT_PREFIX + json.dumps(event, default=str), flush=True)


def use_cpu(device: str) -> bool:
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


def make_accelerator(cfg: TrainConfig, cpu: bool):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if not torch.distributed.is_initialized():
        AcceleratorState._reset_state(reset_partial_state=True)  # a fresh run in a long-lived process
    return Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision, step_scheduler_with_optimizer=False)


def run_training(spec: RunSpec, emit: Emit | None = None, after_step: Sequence[AfterStep] = ()) -> dict[str, Any]:
    """Train to the end (resuming from the newest checkpoint), export, write result.json. `emit` gets rank
    0's events; `after_step` hooks run at the end of every optimiser step, after its checkpoint."""
    cfg = TrainConfig.model_validate(spec.train)
    acc = make_accelerator(cfg, use_cpu(spec.device))
    emit = emit if (emit is not None and acc.is_main_process) else (lambda e: None)
    t_start = time.time()
    try:
        p = build_parts(spec, cfg, acc, emit)
        try:
            emit({"event": "start", "total_steps": p.total, "steps_per_epoch": p.steps_per_epoch,
                  "world_size": acc.num_processes, "device": str(acc.device)})
            val = train(p, after_step)
        finally:
            p.stream.close()
            p.log.close()
        return finish(p, val, time.time() - t_start)
    finally:
        acc.wait_for_everyone()
        acc.end_training()


def train(p: TrainParts, after_step: Sequence[AfterStep] = ()) -> dict[str, float]:
    """Optimiser steps from `p.state.step` to `p.total`; the last validation numbers ({} when none ran)."""
    cfg, state = p.cfg, p.state
    samples_per_step = cfg.grad_accum * cfg.batch_size * p.acc.num_processes
    reader_state, window = p.reader_state, Window()
    val: dict[str, float] = {}
    while state.step < p.total:
        wait = 0.0
        for _ in range(cfg.grad_accum):  # a window may span an epoch end: the stream chains epochs
            b, waited = p.stream.next()
            wait += waited
            p.engine.micro_step(b)
            reader_state, state.epoch = b.reader_state, b.epoch
        out = p.engine.optimizer_step()
        state.step += 1
        state.micro_batches += cfg.grad_accum
        state.samples_seen += samples_per_step
        window.samples += samples_per_step
        window.wait += wait
        count_outcome(state, out, tolerance=cfg.nan_tolerance, work=p.work)  # raises after too many in a row
        final = state.step == p.total
        hooks.say_step(p, out)
        if due(state.step, cfg.logging.every, final):
            hooks.log_row(p, out, window)
            window = Window()
        t_extra = time.perf_counter()
        if p.heldout and due(state.step, cfg.validation.every, final):
            val = hooks.validate(p)
        if cfg.sampling.prompts and due(state.step, cfg.sampling.every, final):
            hooks.sample(p)
        hooks.export_epoch(p, final)
        # Last: a checkpoint comes after this step's epoch export, or a kill between them would lose it.
        if due(state.step, cfg.checkpoint_every, final):
            hooks.checkpoint(p, reader_state)
        window.extra += time.perf_counter() - t_extra  # kept out of the next row's samples/s
        for hook in after_step:
            hook(state)
    return val
