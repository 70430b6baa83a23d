"""Start the training processes: in this process (one GPU or the CPU) or `accelerate launch` (N GPUs).

The accelerate path runs `python -m accelerate.commands.launch ... -m tasks.train.worker <run.json>` and
relays its output line by line: progress events (`@@booruflow-train {json}`) go to `on_event`, every
other line to `on_line` (the flow-run log). Multi-node runs take accelerate's own config file
(`train.accelerate_config`), which names machines, ranks and the main process address.
"""
from __future__ import annotations

import json
import math
import os
import socket
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from data_contracts.errors import StageError
from tasks.common.workers import REPO_ROOT, Supervisor, child_env
from tasks.train.loop import EVENT_PREFIX, RunSpec, run_training, use_cpu

__all__ = ["REPO_ROOT", "accelerate_command", "cpu_threads_per_process", "duration", "event_line", "free_port",
           "launch", "launch_accelerate", "plan_launch", "tensorboard_hint", "visible_gpus"]  # REPO_ROOT: for tests
LineFn = Callable[[str], None]
EventFn = Callable[[dict], None]


def duration(seconds: float | None) -> str:
    """3h07m, 4m05s, 12s; '?' when unknown."""
    if seconds is None or math.isnan(seconds) or seconds < 0:
        return "?"
    m, sec = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


def _num(value: float | None, fmt: str) -> str:
    return "?" if value is None or math.isnan(value) else format(value, fmt)


def event_line(event: dict[str, Any]) -> str | None:
    """The log line of a training event (None: the event only moves the progress bar)."""
    kind = event.get("event")
    if kind == "step":
        step, total = int(event["step"]), int(event["total_steps"])
        why = " · epoch end" if event.get("epoch_end") else ""
        return (f"train: step {step}/{total} ({100 * step / max(1, total):.1f} %) · epoch {event['epoch']}/"
                f"{event['epochs']}{why} · loss {_num(event.get('loss_smoothed'), '.4f')} (smoothed; this step "
                f"{_num(event.get('loss'), '.4f')}) · lr {_num(event.get('lr'), '.2e')} · "
                f"{_num(event.get('samples_per_s'), '.1f')} samples/s · elapsed {duration(event.get('elapsed_s'))} · "
                f"ETA {duration(event.get('eta_s'))}")
    if kind == "start":
        return (f"train: {event['total_steps']} optimiser steps ({event['steps_per_epoch']} batches an epoch per "
                f"process), {event['world_size']} process(es) on {event['device']}")
    if kind == "resume":
        return f"train: resuming from checkpoint {event['checkpoint']} at step {event['step']}"
    if kind == "samples":
        return f"train: sample grid at step {event['step']}: {event['path']}"
    if kind == "done":
        return (f"train: finished {event.get('steps')} steps in {duration(event.get('wall_s'))}, final loss "
                f"{_num(event.get('final_loss'), '.4f')}, {_num(event.get('mean_samples_per_s'), '.1f')} samples/s")
    return None


def tensorboard_hint(logdir: Path | str) -> str:
    """How to watch the run: the tensorboard next to this Python (the project's venv) when it is there."""
    exe = Path(sys.executable).parent / "tensorboard"
    return f"{exe if exe.exists() else 'tensorboard'} --logdir {logdir}"


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def plan_launch(launcher: str, num_processes: int | None, device: str, accelerate_config: str | None = None
                ) -> tuple[str, int]:
    """("inprocess" | "accelerate", processes)."""
    cpu = use_cpu(device)
    n = num_processes or (1 if cpu else max(1, visible_gpus()))
    if launcher == "inprocess":
        if n > 1:
            raise StageError(f"train.launcher=inprocess runs one process, but train.num_processes={n}: "
                             "use train.launcher=accelerate (or auto)")
        return "inprocess", 1
    if launcher == "accelerate" or n > 1 or accelerate_config:
        return "accelerate", n
    return "inprocess", 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_threads_per_process(num_processes: int) -> int:
    """OpenMP/intra-op threads for each training process: OMP_NUM_THREADS when the user set it, else this
    host's cores shared out, so data loading and the optimizer's host work are not held to accelerate's 1 thread.
    The compiled DDP step scaled at 94.6-97.0% with cores / processes and 93.4-97.1% with 1 on 2 H200s (BENCHMARKS.md)."""
    given = os.environ.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given)
    return max(1, (os.cpu_count() or 1) // max(1, num_processes))


def accelerate_command(run_file: Path, num_processes: int, *, config_file: str | None = None,
                       port: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file:
        cmd += ["--config_file", str(config_file)]
    else:
        if num_processes > 1:
            cmd += ["--multi_gpu"]
        cmd += ["--num_processes", str(num_processes), "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", str(port or free_port()),
                "--num_cpu_threads_per_process", str(cpu_threads_per_process(num_processes))]
    return cmd + ["-m", "tasks.train.worker", str(run_file)]


def launch_accelerate(run_file: Path, num_processes: int, *, on_line: LineFn, on_event: EventFn,
                      config_file: str | None = None, port: int | None = None, env: dict | None = None) -> None:
    """Run `accelerate launch` and relay it here (rank 0's events to on_event, every other line to on_line).
    Its whole process group goes down with a cancelled or failing caller; a training process that gave up
    with a user error raises that error here, any other failure a StageError with the last lines."""
    cmd = accelerate_command(run_file, num_processes, config_file=config_file, port=port)
    on_line("launching: " + " ".join(cmd))
    with Supervisor(on_line=lambda worker, line: on_line(line), on_event=lambda worker, event: on_event(event),
                    event_prefix=EVENT_PREFIX) as supervisor:
        # accelerate hands out the GPUs itself; NVLink multicast never (shared hosts)
        supervisor.start("training processes", cmd, env=child_env(None, env, NCCL_NVLS_ENABLE="0"))
        supervisor.relay()
    supervisor.check(user_error="training failed: {message}")


def launch(spec: RunSpec, run_file: Path, *, launcher: str, num_processes: int | None,
           accelerate_config: str | None = None, port: int | None = None,
           on_line: LineFn = print, on_event: EventFn = lambda e: None) -> dict:
    """Run the training and return its result (result.json of the work folder)."""
    mode, n = plan_launch(launcher, num_processes, spec.device, accelerate_config)
    spec.save(run_file)
    if mode == "inprocess":
        return run_training(spec, emit=on_event)
    launch_accelerate(run_file, n, on_line=on_line, on_event=on_event, config_file=accelerate_config, port=port)
    from tasks.train.loop import RESULT_NAME

    return json.loads((Path(spec.work) / RESULT_NAME).read_text())
