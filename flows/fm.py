"""The Prefect flow `fm`: runs the requested stages in DAG order, each as a task with its own state."""
from __future__ import annotations

import functools
import json
import os
import threading
import time
from contextlib import contextmanager, nullcontext
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from data_contracts.errors import BooruflowError, ConfigError
from data_contracts.lock import StageLock
from data_contracts.store import ArtifactStore
from flows.publish import ProgressReporter, publish_outcome
from pipeline_config.load import load_config
from pipeline_config.schema import PipelineConfig
from pipeline_config.secrets import install_redaction, register_secret
from tasks.common.claims import run_claimed
from tasks.common.shard_workers import WorkerSlot, run_in_workers
from tasks.common.stage import (
    StageOutcome,
    finish_stage,
    is_cached,
    plan_shards,
    prepare_stage,
    reopen_stage,
    worker_slots,
)
from tasks.phases import PHASE_STAGES, check_phase, check_phases, eval_config, has_phases, run_phases
from tasks.registry import select_stages, stage_spec


def secret_env_names(cfg: PipelineConfig) -> list[str]:
    """Every `*_env` field in the config names an environment variable holding a secret."""
    names: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key.endswith("_env") and isinstance(value, str) and value:
                    names.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(cfg.model_dump(mode="json"))
    return names


def load_prefect_secrets(cfg: PipelineConfig) -> None:
    """Fill secret env vars that are unset from Prefect Secret blocks of the same name (lowercase, dashes)."""
    for env_name in secret_env_names(cfg):
        if os.environ.get(env_name):
            register_secret(os.environ[env_name])
            continue
        try:
            from prefect.blocks.system import Secret

            value = Secret.load(env_name.lower().replace("_", "-")).get()
        except Exception:  # no such block (or no server): the stage reports the missing credential
            continue
        os.environ[env_name] = value
        register_secret(value)


def file_server(cfg: PipelineConfig) -> tuple[str, str] | None:
    """(base URL, served root) of the data-root file server: set by `fm up`/`fm serve --files`."""
    url, root = os.environ.get("BOORUFLOW_FILES_URL"), os.environ.get("BOORUFLOW_FILES_ROOT")
    if url and root:
        return url, root
    fs = cfg.runtime.file_server
    return (f"http://{fs.host}:{fs.port}", cfg.data_root) if fs.enabled else None


def __getattr__(name: str):
    """GPU_STAGES: the stages whose spec says they may use a GPU (tasks/registry.py is the one stage list)."""
    if name == "GPU_STAGES":
        from tasks.registry import implemented_stages

        return frozenset(s for s in implemented_stages() if stage_spec(s).gpu)
    raise AttributeError(name)


GPU_LIMIT = "booruflow-gpu"  # default name of the Prefect global concurrency limit (runtime.gpu_limit)


def worker_env() -> dict[str, str]:
    """What a local cluster's worker processes need to report to this flow's Prefect API.

    Workers inherit the environment, so a PREFECT_API_URL set there reaches them. Without one, this process
    talks to a temporary API it started itself: pass its URL on, or each worker would start a temporary
    server of its own (seconds each) and its task runs would be missing from this flow run.
    """
    if os.environ.get("PREFECT_API_URL"):
        return {}
    try:
        from prefect.client.orchestration import get_client

        return {"PREFECT_API_URL": str(get_client(sync_client=True).api_url).rstrip("/")}
    except Exception:  # no API at all (plain function call): the workers need none either
        return {}


def make_task_runner(cfg: PipelineConfig):
    """The runner that executes a stage's shards: threads (default), Dask or Ray, by config.

    With runner_address the cluster is yours: its workers need this project installed, the same
    PREFECT_API_URL as the flow, and a data_root they can all reach (a shared folder or object storage).
    Without one, a local cluster of runtime.max_workers single-threaded worker processes is started.
    """
    kind, address = cfg.runtime.task_runner, cfg.runtime.runner_address
    if kind == "thread":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=cfg.runtime.max_workers)
    if kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as exc:
            raise ConfigError("runtime.task_runner=dask needs prefect-dask: pip install 'booruflow[dask]'") from exc
        if address:
            return DaskTaskRunner(address=address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.runtime.max_workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None, "env": worker_env()})
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as exc:
        raise ConfigError("runtime.task_runner=ray needs prefect-ray: pip install 'booruflow[ray]'") from exc
    if address:
        return RayTaskRunner(address=address)
    return RayTaskRunner(init_kwargs={"num_cpus": cfg.runtime.max_workers,
                                      "runtime_env": {"env_vars": worker_env()}})


def runner_shards(cfg: PipelineConfig) -> bool:
    """Whether this flow maps a stage's shards over a cluster runner's workers (Dask, Ray). Stages read it
    from their context (StageContext.sharded), never from the runner's name."""
    return cfg.runtime.task_runner in ("dask", "ray")


def _outcome_summary(stage: str, outcome: StageOutcome, shards: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "stage": stage,
        "fingerprint": outcome.manifest.fingerprint,
        "cached": outcome.cached,
        "output": outcome.output_path,
        "row_counts": outcome.manifest.row_counts,
        "shards": shards or [],
    }


def _store(cfg: PipelineConfig) -> ArtifactStore:
    """One store per object-store root in a process: a worker running many shards lists the pool once."""
    runtime = cfg.runtime
    if "://" not in str(cfg.data_root) or str(cfg.data_root).startswith("file://"):
        return ArtifactStore.for_config(cfg)
    return _store_for(cfg.data_root, str(runtime.cache_dir),
                      json.dumps(getattr(runtime, "storage_options", None) or {}, sort_keys=True, default=str))


@functools.lru_cache(maxsize=8)
def _store_for(data_root: str, cache_dir: str, storage_options: str) -> ArtifactStore:
    return ArtifactStore(data_root, cache_dir, json.loads(storage_options) or None)


def _publish(stage: str, cfg: PipelineConfig, outcome: StageOutcome) -> None:
    store = _store(cfg)
    publish_outcome(outcome, file_server(cfg), open_file=lambda rel: store.path(outcome.manifest, rel))
    get_run_logger().info("%s %s: %s", stage, "cached" if outcome.cached else "built", outcome.output_path)


# ---------------------------------------------------------------------------------------------- GPU slot
SLOT_FIRST_WAIT_S = 3.0  # a free slot is granted at once: after this long, say that the stage waits
SLOT_LOG_EVERY_S = 30.0  # then say it again this often while it waits
Note = Callable[[str], None]


def stage_device(stage: str, cfg: PipelineConfig) -> str:
    """The device a stage runs on: its own `device` (tag), else runtime.device (cache, train, eval); `auto`
    resolved on this host (a stage whose work runs on a remote Dask/Ray cluster keeps `auto`: unknown here)."""
    device = getattr(getattr(cfg, stage, None), "device", None) or cfg.runtime.device
    if device == "auto" and not cfg.runtime.runner_address:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device


def takes_gpu_slot(stage: str, cfg: PipelineConfig, force: bool = False) -> bool:
    """A GPU stage that will run on a GPU. One on the CPU never queues behind another run's GPU work; a
    complete output (not forced) only reads manifests, so it does not queue either."""
    if not stage_spec(stage).gpu or stage_device(stage, cfg) == "cpu":
        return False
    if force:
        return True
    try:
        return not is_cached(stage_spec(stage), cfg, _store(cfg))
    except BooruflowError:  # e.g. no upstream output: the stage itself says so, inside its task
        return True


def read_gpu_limit(name: str):
    """The global concurrency limit `name`, or None when it does not exist or is inactive."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            return None
    return limit if limit.active else None


def _this_flow_run() -> UUID | None:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return ctx.flow_run.id if ctx is not None and ctx.flow_run is not None else None


SLOT_PHASES = {"prefect.concurrency-limit.acquired": 1, "prefect.concurrency-limit.released": -1}


def _slot_events(client, limit_id: UUID, days: int, pages: int = 4) -> list:
    """The newest acquired/released events of the limit (50 a page, the API's maximum)."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter

    since = datetime.now(timezone.utc) - timedelta(days=days)
    page = client.read_events(EventFilter(occurred=EventOccurredFilter(since=since),
                                          event=EventNameFilter(name=list(SLOT_PHASES)),
                                          resource=EventResourceFilter(id=[f"prefect.concurrency-limit.{limit_id}"])),
                              limit=50)
    events = list(page.events)
    for _ in range(pages - 1):
        if not page.next_page:
            break
        page = client.read_events_page(str(page.next_page))
        events += page.events
    return events


def _net_holders(events: list) -> dict[UUID, tuple[str, datetime]]:
    """Flow run id -> (its description, when it took the slot) for runs with more acquired than released."""
    held: dict[UUID, int] = {}
    about: dict[UUID, tuple[str, datetime]] = {}
    for event in events:
        roles = {r.role: r for r in event.related}
        run = roles.get("flow-run")
        if run is None or not run.id.startswith("prefect.flow-run."):
            continue  # taken outside any flow run: nothing to name
        run_id = UUID(run.id.removeprefix("prefect.flow-run."))
        held[run_id] = held.get(run_id, 0) + SLOT_PHASES[event.event]
        if SLOT_PHASES[event.event] > 0 and (run_id not in about or event.occurred > about[run_id][1]):
            where = "/".join(r.name for r in (roles.get("flow"), roles.get("deployment")) if r is not None and r.name)
            about[run_id] = (f"{where + ' ' if where else ''}run '{run.name}'", event.occurred)
    return {i: about[i] for i, n in held.items() if n > 0 and i in about}


def slot_holders(limit_id: UUID, exclude: UUID | None = None, days: int = 7) -> list[str]:
    """Who holds slots of the limit now, as far as Prefect can tell: the flow runs with more `acquired` than
    `released` concurrency events for it (Prefect records them with the run that took the slot) that are
    still running. Best effort: [] when the API keeps no events."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    try:
        with get_client(sync_client=True) as client:
            holders = {i: v for i, v in _net_holders(_slot_events(client, limit_id, days)).items() if i != exclude}
            if not holders:
                return []
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(holders))))
    except Exception:  # who holds it is a courtesy: never fail or stall a stage over it
        return []
    live = {r.id for r in runs if r.state is not None and not r.state.is_final()}
    return [f"{name} (since {since.astimezone().strftime('%H:%M:%S')})" for i, (name, since) in holders.items()
            if i in live]


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def waiting_line(stage: str, name: str, waited_s: float, me: UUID | None = None) -> str:
    """What the stage waits for: the limit, its slots, and who holds them when Prefect can tell."""
    try:
        limit = read_gpu_limit(name)
    except Exception:  # an unreachable API: still say that the stage waits
        limit = None
    if limit is None:
        return f"{stage}: waiting for a slot of the GPU limit '{name}'; waited {_duration(waited_s)} so far"
    holders = slot_holders(limit.id, exclude=me)
    unnamed = max(0, limit.active_slots - len(holders))
    who = ", ".join(holders + ([f"{unnamed} holder(s) outside any flow run Prefect can name"] if unnamed and holders
                               else []))
    return (f"{stage}: waiting for the GPU: {limit.active_slots}/{limit.limit} slot(s) of concurrency limit '{name}' "
            f"taken{' by ' + who if who else ' (Prefect cannot tell by whom)'}; waited {_duration(waited_s)} so far. "
            f"More slots: `fm serve --gpu-slots N`; the limit counts across the whole Prefect server")


@contextmanager
def hold_gpu_slot(stage: str, name: str, log, note: Note | None = None) -> Iterator[None]:
    """Hold one slot of the limit for the block. Prefect's concurrency() waits without a word (and a short
    timeout_seconds logs an ERROR from Prefect's acquisition service on every expiry), so it waits as usual
    while a side thread says, after SLOT_FIRST_WAIT_S and then every SLOT_LOG_EVERY_S, what it waits for and
    who holds it (a log line and a progress note)."""
    from prefect.concurrency.sync import concurrency

    got = threading.Event()
    started = time.monotonic()
    me = _this_flow_run()  # context variables do not reach the side thread
    said: list[str] = []

    def talk() -> None:
        wait = SLOT_FIRST_WAIT_S
        while not got.wait(wait):
            line = waiting_line(stage, name, time.monotonic() - started, me)
            if got.is_set():
                return
            said.append(line)
            log.info("%s", line)
            if note is not None:
                note(line.split("; ")[0].removeprefix(f"{stage}: "))
            wait = SLOT_LOG_EVERY_S

    talker = threading.Thread(target=talk, name=f"{stage}-gpu-slot-wait", daemon=True)
    talker.start()
    try:
        with concurrency(name, occupy=1, strict=False):
            got.set()
            talker.join(timeout=10)
            if said:
                log.info("%s: got the GPU slot of '%s' after %s", stage, name, _duration(time.monotonic() - started))
            yield
    finally:
        got.set()


def _gpu_slot(stage: str, cfg: PipelineConfig, force: bool = False, log=None, note: Note | None = None):
    """Hold the GPU concurrency slot so two runs never fight for one GPU (no-op without the limit).

    Only a GPU stage that will really run on a GPU takes it (takes_gpu_slot). A missing limit (no
    `fm serve`, an in-process `fm run`) is checked once and skipped with a debug line, rather than
    Prefect's warning on every acquisition.
    """
    if not takes_gpu_slot(stage, cfg, force):
        return nullcontext()
    log = log or get_run_logger()
    name = cfg.runtime.gpu_limit
    if read_gpu_limit(name) is None:
        log.debug("%s: no concurrency limit '%s' on this Prefect server: not holding a GPU slot", stage, name)
        return nullcontext()
    return hold_gpu_slot(stage, name, log, note)


@task(name="stage", retries=0, cache_policy=NO_CACHE)
def stage_task(stage: str, cfg: PipelineConfig, force: bool, progress_id: UUID | None = None) -> dict[str, Any]:
    """Prepare a stage; unsharded stages also build, commit and publish here. progress_id: the stage's
    progress artifact (made by the flow, which also finishes it)."""
    install_redaction()
    progress = ProgressReporter(stage, artifact_id=progress_id)
    try:
        prepared = prepare_stage(stage_spec(stage), cfg, _store(cfg), force=force, progress=progress,
                                 log=get_run_logger(), sharded=runner_shards(cfg))  # type: ignore[arg-type]
        shards = plan_shards(prepared)
        if shards:
            # Device worker processes only under the thread runner: a cluster runner places shards itself.
            slots = worker_slots(prepared, len(shards)) if not runner_shards(cfg) else []
            progress(0.02, f"{len(shards)} shard(s) planned")
            return {"stage": stage, "fingerprint": prepared.ctx.fingerprint, "cached": False, "shards": shards,
                    "slots": [slot.device for slot in slots]}
        outcome = finish_stage(prepared)
    finally:
        progress.close()
    if progress_id is None:  # called on its own: nobody else finishes its progress
        progress.done(outcome.cached)
    _publish(stage, cfg, outcome)
    return _outcome_summary(stage, outcome)


@task(name="shard", retries=1, cache_policy=NO_CACHE)
def shard_task(stage: str, cfg: PipelineConfig, fingerprint: str, shard: dict[str, Any]) -> dict[str, Any]:
    """One shard of a stage, on whichever worker the task runner picks (idempotent, so retried safely)."""
    install_redaction()
    load_prefect_secrets(cfg)  # a worker on another machine: credentials from Secret blocks, as the flow has
    spec = stage_spec(stage)
    prepared = reopen_stage(spec, cfg, _store(cfg), fingerprint, log=get_run_logger(),  # type: ignore[arg-type]
                            sharded=runner_shards(cfg))
    return spec.run_shard(prepared.ctx, shard)  # type: ignore[misc]


@task(name="workers", retries=0, cache_policy=NO_CACHE)
def device_worker_task(stage: str, cfg: PipelineConfig, fingerprint: str, device: str, shards: list[dict[str, Any]],
                       claims: str, here: bool) -> list[dict[str, Any]]:
    """One device's part of a stage's shards: it claims shards from the shared folder until none are left,
    in this process (`here`: the first device, whose model loads at once) or in a worker process."""
    install_redaction()
    if here:
        spec = stage_spec(stage)
        prepared = reopen_stage(spec, cfg, _store(cfg), fingerprint, log=get_run_logger(),  # type: ignore[arg-type]
                                sharded=runner_shards(cfg))
        return run_claimed(shards, Path(claims), lambda shard: spec.run_shard(prepared.ctx, shard))  # type: ignore[misc]
    return run_in_workers(stage, cfg.model_dump(mode="json"), fingerprint, shards, [WorkerSlot(device)],
                          log=get_run_logger(), claims=Path(claims), sharded=runner_shards(cfg))  # type: ignore[arg-type]


@task(name="merge", retries=0, cache_policy=NO_CACHE)
def merge_task(stage: str, cfg: PipelineConfig, fingerprint: str, results: list[dict[str, Any]],
               force: bool = False) -> dict[str, Any]:
    install_redaction()
    prepared = reopen_stage(stage_spec(stage), cfg, _store(cfg), fingerprint, log=get_run_logger(),  # type: ignore[arg-type]
                            force=force, sharded=runner_shards(cfg))
    outcome = finish_stage(prepared, results)
    _publish(stage, cfg, outcome)
    return _outcome_summary(stage, outcome, results)


def _ray_gpu_options(stage: str, cfg: PipelineConfig):
    """Under the Ray runner, a GPU stage set to device cuda (tag.device; runtime.device for cache) gets one GPU
    per shard task (Ray sets each task's
    CUDA_VISIBLE_DEVICES), so shards spread over every GPU of the cluster."""
    from contextlib import nullcontext

    # The stage's own device (tag.device), else runtime.device (cache).
    device = getattr(getattr(cfg, stage, None), "device", None) or cfg.runtime.device
    if cfg.runtime.task_runner != "ray" or not stage_spec(stage).gpu or device != "cuda":
        return nullcontext()
    from prefect_ray.context import remote_options

    return remote_options(num_gpus=1)


def run_sharded(stage: str, cfg: PipelineConfig, info: dict[str, Any], force: bool = False,
                progress: Callable[[float, str], None] | None = None) -> dict[str, Any]:
    """Map the stage's shards over the configured task runner, then merge into one contract.

    A stage that asks for worker processes (one per GPU) under the thread runner gets one task per
    device, each running its round-robin share of the shards in its own process.
    """
    progress = progress or (lambda fraction, message: None)
    slots = info.get("slots") or []
    n = len(info["shards"])
    if len(slots) > 1:
        import shutil
        import tempfile

        from prefect.task_runners import ThreadPoolTaskRunner

        claims = tempfile.mkdtemp(prefix=f"booruflow-{stage}-claims-")  # shared by this host's device tasks
        try:
            with ThreadPoolTaskRunner(max_workers=len(slots)) as runner:  # every device at once
                futures = [
                    runner.submit(
                        device_worker_task.with_options(task_run_name=f"{stage}-{WorkerSlot(device).label}-{r}"),
                        {"stage": stage, "cfg": cfg, "fingerprint": info["fingerprint"], "device": device,
                         "shards": info["shards"], "claims": claims, "here": r == 0},
                    )
                    for r, device in enumerate(slots)
                ]
                progress(0.05, f"{n} shard(s) on {len(slots)} device workers")
                by_index = {}
                for done, future in enumerate(futures, 1):  # in order: the same on every runner
                    by_index.update({int(s["index"]): s for s in future.result()})
                    progress(0.05 + 0.85 * done / len(futures), f"{done}/{len(futures)} device workers done")
        finally:
            shutil.rmtree(claims, ignore_errors=True)
        # A shard nobody reported (a worker died after claiming it) is run by the merge (build runs any
        # shard missing from the journal).
        results = [by_index[int(s["index"])] for s in info["shards"] if int(s["index"]) in by_index]
    else:
        with make_task_runner(cfg) as runner, _ray_gpu_options(stage, cfg):
            futures = [
                runner.submit(
                    shard_task.with_options(task_run_name=f"{stage}-shard-{i}"),
                    {"stage": stage, "cfg": cfg, "fingerprint": info["fingerprint"], "shard": shard},
                )
                for i, shard in enumerate(info["shards"])
            ]
            results = []
            for future in futures:  # in order (Dask and Ray futures too): a shard's progress may show late
                results.append(future.result())
                progress(0.05 + 0.85 * len(results) / n, f"shard {len(results)}/{n}")
    progress(0.92, "merging shards")
    return merge_task.with_options(task_run_name=f"{stage}-merge")(stage, cfg, info["fingerprint"], results, force)


def _run_one(stage: str, cfg: PipelineConfig, force: bool) -> dict[str, Any]:
    """One stage, its progress artifact ending at 100 % (built or cached) or saying why it failed.

    The stage lock on the data root, then the GPU slot, each span the whole stage (prepare, every shard on
    whatever runner, merge): a second run of the stage waits for the lock without holding a GPU.
    """
    log = get_run_logger()
    progress = ProgressReporter(stage, bar=False)
    try:
        with StageLock(_store(cfg), stage, log=log), _gpu_slot(stage, cfg, force, log, progress.note):  # type: ignore[arg-type]
            # a phase's bucket, cache and train told apart in the UI (eval runs once, on the last phase)
            name = f"{stage}-{cfg.train.phase}" if cfg.train.phase and stage in PHASE_STAGES else stage
            info = stage_task.with_options(name=stage, task_run_name=name)(stage, cfg, force, progress.artifact_id)
            if info["shards"] and not info["cached"]:
                info = run_sharded(stage, cfg, info, force, progress)
    except BaseException as exc:
        progress.failed(exc)
        raise
    progress.done(bool(info["cached"]))
    return info


def run_ab_experiment(cfg: PipelineConfig, force: bool) -> list[dict[str, Any]]:
    """Train with the flow and with the DDPM objective on the same data and step budget, then evaluate both."""
    from types import SimpleNamespace

    from data_contracts.registry import manifest_class
    from tasks.eval.ab import run_ab

    store = _store(cfg)
    results: list[dict[str, Any]] = []

    def run(stage: str, stage_cfg: PipelineConfig) -> SimpleNamespace:
        info = _run_one(stage, stage_cfg, force)
        results.append({**info, "objective": stage_cfg.train.objective})
        return SimpleNamespace(manifest=store.read_manifest(manifest_class(stage), info["fingerprint"]))

    run_ab(cfg, store, run)
    return results


def run_in_phases(cfg: PipelineConfig, todo: list[str], force: bool, ab: bool, phase: str | None
                  ) -> list[dict[str, Any]]:
    """A run in phases (tasks/phases.py): the stages before bucket once, then each phase's bucket, cache and
    train from the previous phase's weights, then eval on the last phase comparing them all."""
    from data_contracts.train import TrainManifest

    if ab:
        raise ConfigError("--ab and train.phases together are not supported: run the A/B on one phase's config")
    check_phase(cfg, phase)
    check_phases(cfg)
    store = _store(cfg)
    results = [_run_one(stage, cfg, force) for stage in todo if stage not in (*PHASE_STAGES, "eval")]

    def init_path(info: dict[str, Any]) -> str:
        manifest = store.read_manifest(TrainManifest, info["fingerprint"])
        return str(store.path(manifest, manifest.checkpoint))

    done = run_phases(cfg, todo, lambda stage, pcfg, f: _run_one(stage, pcfg, f), init_path, force=force,
                      only=phase)
    results += done.results
    if "eval" in todo and phase is None and done.last_config is not None:
        results.append(_run_one("eval", eval_config(done.last_config, done.trains), force))
    return results


UPDATE_OVERRIDE = "ingest.update.enabled=true"


def run_overrides(overrides: list[str] | None, update: bool) -> list[str]:
    """The overrides of a run; `update` (`fm run --update`, the deployments' `update`) turns ingest's update mode on."""
    return [*(overrides or []), UPDATE_OVERRIDE] if update else list(overrides or [])


@flow(name="fm", log_prints=True)
def fm(
    config: str = "demo",
    stages: list[str] | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
    ab: bool = False,
    phase: str | None = None,
    update: bool = False,
) -> list[dict[str, Any]]:
    """Run `stages` (default: all implemented, in DAG order) of the pipeline described by `config`.

    config: a preset name (demo, nai-v2-fm) or a YAML path; overrides: ["train.lr=1e-5", ...];
    force: rebuild the selected stages even when a complete output with their fingerprint exists;
    ab: after the data stages, train with the flow and the DDPM objective (same data, same step budget)
    and evaluate both the same way, instead of one train + eval; phase: with train.phases, run the selected
    stages of this phase only (its earlier phases' outputs are reused, or built when missing);
    update: ingest makes a new output extending the newest one of this config with what was added, changed and
    removed on Danbooru since (`fm run ingest --update`), and the later stages run on it.
    """
    try:
        cfg = load_config(config, run_overrides(overrides, update))
        todo = select_stages(stages)
        load_prefect_secrets(cfg)
        if has_phases(cfg) or phase is not None:
            return run_in_phases(cfg, todo, force, ab, phase)
        results = [_run_one(stage, cfg, force) for stage in todo if not (ab and stage in ("train", "eval"))]
        if ab:
            results += run_ab_experiment(cfg, force)
        return results
    except BooruflowError as exc:
        # The reason as the run's last log line, in the UI's log of the run (the state shows only "Failed").
        get_run_logger().error("fm failed: %s", exc)
        raise
