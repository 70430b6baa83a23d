"""Spread a sharded stage's shards over worker processes: one per GPU (or N on the CPU).

Each worker runs `worker_main(<job.json>)` (through tasks.common.worker_entry) with CUDA_VISIBLE_DEVICES set
to its one GPU, so the stage code inside sees exactly one device and "cuda" means that GPU. A worker reopens
the stage (same fingerprint, same work folder) and runs its shards with the stage's own `run_shard`, which
journals each shard (done mark last): a killed worker loses at most the shard it was on, and the parent
only collects summaries from the journal, so a rerun of the stage redoes only unfinished shards.

Shards are handed out dynamically (tasks/common/claims.py): every participant walks the plan in order and
takes the next shard no one has claimed, so a GPU that starts late or runs slow simply takes fewer. The
calling process can take part itself (`local`: it has the model loaded already, so it starts at once while
the workers import and load theirs). Worker output is relayed line by line to the stage log; a
`@@booruflow-shard {json}` line reports a finished shard. A worker that fails makes the call fail with its
own error or its last lines (finished shards stay journaled); the parent going down (flow cancelled) takes
every worker's process group with it (tasks/common/workers.py supervises).
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_contracts.errors import ConfigError, StageError
from tasks.common.claims import ShardFn, claim, claim_owners, run_claimed
from tasks.common.workers import (
    Supervisor,
    Worker,
    child_env,
    python_call,
    visible_gpu_ids,
)

__all__ = ["EVENT_PREFIX", "WorkerSlot", "claim", "claim_owners", "plan_slots", "run_claimed", "run_in_workers",
           "visible_gpu_ids", "worker_env"]
EVENT_PREFIX = "@@booruflow-shard "


@dataclass(frozen=True)
class WorkerSlot:
    """One worker process: which device it gets ("cpu", or a CUDA device id as the parent sees it)."""

    device: str

    @property
    def label(self) -> str:
        return "cpu" if self.device == "cpu" else f"gpu{self.device}"


def plan_slots(processes: int, device: str, n_shards: int) -> list[WorkerSlot]:
    """Worker slots for a stage: `processes` 0 = one per visible GPU on CUDA (one process on the CPU).

    On CUDA, more processes than GPUs is an error (two processes on one GPU only fight over it); on
    the CPU, N processes run N copies of the model (for many-core hosts). Never more slots than shards.
    """
    if device == "cuda":
        gpus = visible_gpu_ids()
        if not gpus:
            raise ConfigError("the stage asks for CUDA but torch sees no GPU; set its device to auto or cpu")
        if processes > len(gpus):
            raise ConfigError(f"{processes} worker processes asked for, but only {len(gpus)} GPU(s) are visible "
                              f"({','.join(gpus)}); use at most one process per GPU, or 0 for all of them")
        slots = [WorkerSlot(g) for g in gpus[: processes or len(gpus)]]
    else:
        slots = [WorkerSlot("cpu")] * max(1, processes)
    return slots[: max(1, min(len(slots), n_shards))]


def worker_env(slot: WorkerSlot, base: dict[str, str] | None = None) -> dict[str, str]:
    """The worker sees only its GPU; on the CPU it must not grab any GPU at all."""
    return child_env(slot.device, base)


def run_in_workers(stage: str, config: dict[str, Any], fingerprint: str, shards: list[dict[str, Any]],
                   slots: list[WorkerSlot], *, log: logging.Logger,
                   on_shard: Callable[[dict[str, Any]], None] = lambda s: None,
                   local: ShardFn | None = None, claims: Path | None = None,
                   sharded: bool = False) -> list[dict[str, Any]]:
    """Run `shards` of a prepared stage in one process per slot (plus this process when `local` runs a shard
    here); return the summaries of the shards done by this call, in plan order.

    `config` is the pipeline config as JSON-able data (model_dump(mode="json")): secrets are never in it
    (they travel as environment variables, which the workers inherit). `claims` is a folder shared with
    other calls working on the same shards (the flow's one task per GPU); by default a private one.
    Without `claims` given, every shard must come back done (a worker that died silently has its shards
    run here when `local` is given, else it is an error); with a shared folder, the caller checks.
    `sharded`: the stage context's flag (StageContext.sharded), handed on to the workers' contexts.
    """
    if not shards:
        return []
    job_dir = Path(tempfile.mkdtemp(prefix=f"booruflow-{stage}-workers-"))
    shared = claims is not None
    claims = claims if shared else job_dir / "claims"
    claims.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
    done: dict[int, dict[str, Any]] = {}

    def finished(summary: dict[str, Any]) -> None:
        done[int(summary["index"])] = summary
        on_shard(summary)

    indices = [int(s["index"]) for s in shards]

    def nothing_left(worker: Worker) -> bool:
        # Every shard has a taker and it is not this worker (still starting up): nothing is left for it.
        owners = claim_owners(claims, indices)  # type: ignore[arg-type]
        if owners is None or worker.pid in owners:
            return False
        log.info("%s: worker on %s has no shard left to take; stopped", stage, worker.label)
        return True

    supervisor = Supervisor(on_line=lambda w, line: log.info("[%s %s] %s", stage, w.label, line),
                            on_event=lambda w, summary: finished(summary), event_prefix=EVENT_PREFIX)
    try:
        with supervisor:
            for r, slot in enumerate(slots):
                job = job_dir / f"worker-{r}.json"
                job.write_text(json.dumps({"stage": stage, "config": config, "fingerprint": fingerprint,
                                           "shards": shards, "claims": str(claims), "label": slot.label,
                                           "sharded": sharded}))
                worker = supervisor.start(f"{stage} worker on {slot.label}",
                                          python_call("tasks.common.shard_workers:worker_main", str(job)),
                                          env=worker_env(slot), label=slot.label)
                log.info("%s: worker %d on %s, pid %d", stage, r, slot.label, worker.pid)
            relay = supervisor.relay_in_background(f"{stage}-relay")
            if local is not None:
                run_claimed(shards, claims, local, finished)  # type: ignore[arg-type]
            supervisor.wait(relay, nothing_left)
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)
    supervisor.check()
    if not shared:
        missing = [s for s in shards if int(s["index"]) not in done]
        if missing and local is not None:
            log.warning("%s: %d shard(s) claimed but not reported by a worker; running them here", stage,
                        len(missing))
            for shard in missing:
                finished(local(shard))
        elif missing:
            raise StageError(f"{stage}: workers exited without reporting shard(s) "
                             f"{[int(s['index']) for s in missing][:10]}; rerun the stage")
    return [done[int(s["index"])] for s in shards if int(s["index"]) in done]


# --- the worker side (started through tasks.common.worker_entry) ----------------------------------
def worker_main(job_file: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    job = json.loads(Path(job_file).read_text())
    stage = job["stage"]
    log = logging.getLogger(f"booruflow.{stage}.{job.get('label', 'worker')}")
    started = time.monotonic()
    from data_contracts.store import ArtifactStore
    from pipeline_config.load import load_config
    from pipeline_config.secrets import install_redaction
    from tasks.common.stage import reopen_stage
    from tasks.registry import stage_spec

    install_redaction()
    cfg = load_config(job["config"])
    spec = stage_spec(stage)
    imported = time.monotonic()
    prepared = reopen_stage(spec, cfg, ArtifactStore.for_config(cfg), job["fingerprint"], log=log,
                            sharded=bool(job.get("sharded")))
    log.info("%s: worker ready in %.1f s (imports %.1f s, stage reopened %.1f s)", stage,
             time.monotonic() - started, imported - started, time.monotonic() - imported)
    run_claimed(job["shards"], Path(job["claims"]), lambda shard: spec.run_shard(prepared.ctx, shard),  # type: ignore[misc]
                lambda summary: print(EVENT_PREFIX + json.dumps(summary), flush=True))
