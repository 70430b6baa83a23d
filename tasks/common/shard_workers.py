"""Spread a sharded stage's shards over worker processes: one per GPU (or N on the CPU).

Each worker is `python -m tasks.common.shard_workers <job.json>` started with CUDA_VISIBLE_DEVICES set to
its one GPU, so the stage code inside sees exactly one device and "cuda" means that GPU. A worker reopens
the stage (same fingerprint, same work folder) and runs its shards with the stage's own `run_shard`, which
journals each shard (done mark last): a killed worker loses at most the shard it was on, and the parent
only collects summaries from the journal, so a rerun of the stage redoes only unfinished shards.

Shards are handed out dynamically: every participant walks the plan in order and takes the next shard no
one has claimed (an O_EXCL file per shard in a claims folder on this machine), so a GPU that starts late or
runs slow simply takes fewer. The calling process can take part itself (`local`: it has the model loaded
already, so it starts at once while the workers import and load theirs). Worker output is relayed line by
line to the stage log; a `@@booruflow-shard {json}` line reports a finished shard. A worker that fails
makes the call fail with its last lines (finished shards stay journaled); the parent going down (flow
cancelled) takes every worker's process group with it.
"""
from __future__ import annotations

import json
import logging
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from data_contracts.errors import ConfigError, ContractError, StageError

REPO_ROOT = Path(__file__).resolve().parents[2]
EVENT_PREFIX = "@@booruflow-shard "
EXIT_USER_ERROR = 3  # a StageError/ConfigError/ContractError inside the worker (its message is the last line)
USER_ERRORS = ("StageError:", "ConfigError:", "ContractError:")


@dataclass(frozen=True)
class WorkerSlot:
    """One worker process: which device it gets ("cpu", or a CUDA device id as the parent sees it)."""

    device: str

    @property
    def label(self) -> str:
        return "cpu" if self.device == "cpu" else f"gpu{self.device}"


def visible_gpu_ids() -> list[str]:
    """CUDA device ids this process may use, as CUDA_VISIBLE_DEVICES would name them to a child."""
    import torch

    if not torch.cuda.is_available():
        return []
    n = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None and listed.strip():
        ids = [x.strip() for x in listed.split(",") if x.strip()]
        return ids[:n]
    return [str(i) for i in range(n)]


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


def claim(claims: Path, index: int) -> bool:
    """Take shard `index` for this process; False when another participant has it (atomic O_EXCL create).
    The file then holds the taker's pid, so a participant holding no shard can be told apart."""
    try:
        fd = os.open(claims / f"shard-{index:05d}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    try:
        os.write(fd, str(os.getpid()).encode())
    finally:
        os.close(fd)
    return True


def claim_owners(claims: Path, indices: list[int]) -> set[int] | None:
    """The pids holding these shards; None while any is still free (or its taker not yet written)."""
    owners = set()
    for index in indices:
        try:
            text = (claims / f"shard-{index:05d}").read_text().strip()
        except FileNotFoundError:
            return None
        if not text.isdigit():
            return None
        owners.add(int(text))
    return owners


ShardFn = Callable[[dict[str, Any]], dict[str, Any]]


def run_claimed(shards: list[dict[str, Any]], claims: Path, run: ShardFn,
                on_shard: Callable[[dict[str, Any]], None] = lambda s: None) -> list[dict[str, Any]]:
    """Run, in plan order, every shard this process manages to claim; return their summaries."""
    out = []
    for shard in shards:
        if claim(claims, int(shard["index"])):
            summary = run(shard)
            out.append(summary)
            on_shard(summary)
    return out


def worker_env(slot: WorkerSlot, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    # The worker sees only its GPU; on the CPU it must not grab any GPU at all.
    env["CUDA_VISIBLE_DEVICES"] = "" if slot.device == "cpu" else slot.device
    return env


def _stop_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_in_workers(stage: str, config: dict[str, Any], fingerprint: str, shards: list[dict[str, Any]],
                   slots: list[WorkerSlot], *, log: logging.Logger,
                   on_shard: Callable[[dict[str, Any]], None] = lambda s: None,
                   local: ShardFn | None = None, claims: Path | None = None) -> list[dict[str, Any]]:
    """Run `shards` of a prepared stage in one process per slot (plus this process when `local` runs a shard
    here); return the summaries of the shards done by this call, in plan order.

    `config` is the pipeline config as JSON-able data (model_dump(mode="json")): secrets are never in it
    (they travel as environment variables, which the workers inherit). `claims` is a folder shared with
    other calls working on the same shards (the flow's one task per GPU); by default a private one.
    Without `claims` given, every shard must come back done (a worker that died silently has its shards
    run here when `local` is given, else it is an error); with a shared folder, the caller checks.
    """
    if not shards:
        return []
    job_dir = Path(tempfile.mkdtemp(prefix=f"booruflow-{stage}-workers-"))
    shared = claims is not None
    claims = claims if shared else job_dir / "claims"
    claims.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
    procs: list[tuple[WorkerSlot, subprocess.Popen, deque[str]]] = []
    done: dict[int, dict[str, Any]] = {}

    def finished(summary: dict[str, Any]) -> None:
        done[int(summary["index"])] = summary
        on_shard(summary)

    relay: threading.Thread | None = None
    stopped: set[int] = set()
    try:
        for r, slot in enumerate(slots):
            job = job_dir / f"worker-{r}.json"
            job.write_text(json.dumps({"stage": stage, "config": config, "fingerprint": fingerprint,
                                       "shards": shards, "claims": str(claims), "label": slot.label}))
            proc = subprocess.Popen([sys.executable, "-m", "tasks.common.shard_workers", str(job)],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                    env=worker_env(slot), cwd=str(REPO_ROOT), start_new_session=True)
            log.info("%s: worker %d on %s, pid %d", stage, r, slot.label, proc.pid)
            procs.append((slot, proc, deque(maxlen=30)))
        relay = threading.Thread(target=_relay, args=(stage, procs, log, finished), name=f"{stage}-relay",
                                 daemon=True)
        relay.start()
        if local is not None:
            run_claimed(shards, claims, local, finished)  # type: ignore[arg-type]
        indices = [int(s["index"]) for s in shards]
        while relay.is_alive():
            relay.join(0.5)
            owners = claim_owners(claims, indices)  # type: ignore[arg-type]
            if owners is None:
                continue
            for slot, proc, _ in procs:
                # Every shard has a taker and it is not this worker (still starting up): nothing is left
                # for it, so it is stopped instead of waited for.
                if proc.poll() is None and proc.pid not in owners and proc.pid not in stopped:
                    log.info("%s: worker on %s has no shard left to take; stopped", stage, slot.label)
                    stopped.add(proc.pid)
                    _stop_group(proc)
    except BaseException:
        for _, proc, _ in procs:  # cancelled, or the parent is going down: no orphans
            _stop_group(proc)
        raise
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)
    failed = [(slot, proc.returncode, tail) for slot, proc, tail in procs
              if proc.returncode != 0 and proc.pid not in stopped]
    if failed:
        slot, rc, tail = failed[0]
        user = next((l for l in reversed(tail) if l.startswith(USER_ERRORS)), None)
        if rc == EXIT_USER_ERROR and user:
            raise StageError(f"{stage} worker on {slot.label}: {user.split(': ', 1)[1]}")
        raise StageError(f"{stage} worker on {slot.label} exited with code {rc}; last output:\n" + "\n".join(tail))
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


def _relay(stage: str, procs: list[tuple[WorkerSlot, subprocess.Popen, deque[str]]], log: logging.Logger,
           on_shard: Callable[[dict[str, Any]], None]) -> None:
    """Forward every worker's lines to the log until all have exited; shard events go to on_shard."""
    sel = selectors.DefaultSelector()
    for r, (slot, proc, tail) in enumerate(procs):
        sel.register(proc.stdout, selectors.EVENT_READ, (r, slot, tail))  # type: ignore[arg-type]
    open_streams = len(procs)
    while open_streams:
        for key, _ in sel.select(timeout=1.0):
            r, slot, tail = key.data
            line = key.fileobj.readline()  # type: ignore[union-attr]
            if not line:
                sel.unregister(key.fileobj)
                open_streams -= 1
                continue
            line = line.rstrip("\n")
            if line.startswith(EVENT_PREFIX):
                try:
                    on_shard(json.loads(line[len(EVENT_PREFIX):]))
                    continue
                except json.JSONDecodeError:
                    pass
            tail.append(line)
            log.info("[%s %s] %s", stage, slot.label, line)
    for _, proc, _ in procs:
        proc.wait()


# --- the worker side ---------------------------------------------------------------------------------
def worker_main(job_file: str) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    job = json.loads(Path(job_file).read_text())
    stage = job["stage"]
    log = logging.getLogger(f"booruflow.{stage}.{job.get('label', 'worker')}")
    started = time.monotonic()
    try:
        from data_contracts.store import ArtifactStore
        from pipeline_config.load import load_config
        from pipeline_config.secrets import install_redaction
        from tasks.common.stage import reopen_stage
        from tasks.registry import stage_spec

        install_redaction()
        cfg = load_config(job["config"])
        spec = stage_spec(stage)
        imported = time.monotonic()
        prepared = reopen_stage(spec, cfg, ArtifactStore.for_config(cfg), job["fingerprint"], log=log)
        log.info("%s: worker ready in %.1f s (imports %.1f s, stage reopened %.1f s)", stage,
                 time.monotonic() - started, imported - started, time.monotonic() - imported)
        run_claimed(job["shards"], Path(job["claims"]), lambda shard: spec.run_shard(prepared.ctx, shard),  # type: ignore[misc]
                    lambda summary: print(EVENT_PREFIX + json.dumps(summary), flush=True))
    except (StageError, ConfigError, ContractError) as exc:
        print(f"{type(exc).__name__}: {exc}", flush=True)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1]))
