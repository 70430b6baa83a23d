"""Atomic, resumable training checkpoints.

Layout under `<work>/checkpoints/`:
    step-00001000/            one complete checkpoint (a folder that exists is complete)
        unet.safetensors      fp32 trainable weights (text_encoder.safetensors, ema.safetensors when used)
        optimizer.pt          optimizer state (torch.save; read back with weights_only=True)
        scheduler.json        LR scheduler state
        trainer.json          step, epoch, counters, world size
        rank-<r>.pt           per-rank reader state and RNG states (weights_only-loadable)
    LATEST                    name of the newest complete checkpoint (written last, atomically)

Every rank writes its own file into a hidden temp folder; after a barrier the main process renames the
folder into place, points LATEST at it, then deletes all but the newest `keep_last`. A kill at any point
leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from data_contracts.errors import StageError
from data_contracts.store import atomic_write_text
from tasks.models.single_file import make_tree_readable

LATEST = "LATEST"
PREFIX = "step-"


@dataclass
class TrainerState:
    step: int = 0  # optimiser steps done
    epoch: int = 0  # epoch of the next micro-batch
    micro_batches: int = 0  # micro-batches consumed (per rank)
    samples_seen: int = 0  # all ranks
    skipped_steps: int = 0
    consecutive_bad: int = 0
    world_size: int = 1
    total_steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def checkpoint_root(work: Path) -> Path:
    return Path(work) / "checkpoints"


def latest_checkpoint(work: Path) -> Path | None:
    root = checkpoint_root(work)
    try:
        name = (root / LATEST).read_text().strip()
    except FileNotFoundError:
        return None
    path = root / name
    return path if (path / "trainer.json").is_file() else None


def _cpu_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": json.dumps(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(work: Path, accelerator, state: TrainerState, *, unet, optimizer, scheduler,
                    reader_state: Any, text_encoder=None, ema=None, keep_last: int = 2) -> Path:
    """Collective: every rank must call it. Returns the committed folder."""
    root = checkpoint_root(work)
    name = f"{PREFIX}{state.step:08d}"
    tmp = root / f".tmp-{name}"
    final = root / name
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save({"reader": reader_state, "rng": rng_state()}, tmp / f"rank-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_file(_cpu_state(accelerator.unwrap_model(unet).state_dict()), str(tmp / "unet.safetensors"))
        if text_encoder is not None:
            save_file(_cpu_state(accelerator.unwrap_model(text_encoder).state_dict()),
                      str(tmp / "text_encoder.safetensors"))
        if ema is not None:
            save_file(_cpu_state(ema.state_dict()), str(tmp / "ema.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict(), default=str))
        (tmp / "trainer.json").write_text(json.dumps(asdict(state), indent=1))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        make_tree_readable(tmp)  # safetensors writes 0600: `fm sample` of a step folder by another user
        if final.exists():  # a rerun reached the same step: replace it
            shutil.rmtree(final)
        tmp.rename(final)
        atomic_write_text(root / LATEST, name)
        done = sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir())
        for old in done[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


@dataclass
class Restored:
    state: TrainerState
    reader_state: Any
    path: Path


def load_checkpoint(path: Path, accelerator, *, unet, optimizer, scheduler, text_encoder=None,
                    ema=None) -> Restored:
    """Load a checkpoint into the (prepared) objects of this rank."""
    state = TrainerState(**json.loads((path / "trainer.json").read_text()))
    if state.world_size != accelerator.num_processes:
        raise StageError(
            f"{path} was written by {state.world_size} process(es), this run has {accelerator.num_processes}: "
            f"the per-rank data position cannot be carried over. Rerun with train.num_processes="
            f"{state.world_size}, or delete {path.parent} to start over")
    accelerator.unwrap_model(unet).load_state_dict(load_file(str(path / "unet.safetensors")))
    if text_encoder is not None:
        accelerator.unwrap_model(text_encoder).load_state_dict(load_file(str(path / "text_encoder.safetensors")))
    if ema is not None and (path / "ema.safetensors").is_file():
        ema.load_state_dict(load_file(str(path / "ema.safetensors"), device=str(accelerator.device)))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    rank = torch.load(path / f"rank-{accelerator.process_index}.pt", map_location="cpu", weights_only=True)
    set_rng_state(rank["rng"])
    return Restored(state=state, reader_state=rank["reader"], path=path)
