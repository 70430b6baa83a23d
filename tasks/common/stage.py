"""The frame every stage plugs into: fingerprint, cache check, work folder, commit, report.

A stage module exposes `SPEC = StageSpec(...)` whose `build(ctx)` does the work in `ctx.work`
and returns a StageResult. Nothing here imports Prefect: flows/ publishes the report.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from data_contracts.errors import ContractError, StageError
from data_contracts.fingerprint import content_id, digest, stage_fingerprint
from data_contracts.lock import StageLock
from data_contracts.manifest import FileEntry, StageManifest
from data_contracts.registry import manifest_class
from data_contracts.store import ArtifactStore
from pipeline_config.load import section_dict
from pipeline_config.schema import PipelineConfig
from tasks.common.shard_workers import WorkerSlot, run_in_workers

REPORT_NAME = "report.json"
ProgressFn = Callable[[float, str], None]


@dataclass
class StageReport:
    """What a person should see of a stage output in the UI (published by flows/)."""

    summary_md: str = ""
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # name -> rows
    images: dict[str, str] = field(default_factory=dict)  # caption -> path relative to the output folder

    def save(self, folder: Path) -> None:
        (folder / REPORT_NAME).write_text(json.dumps(asdict(self), indent=1, default=str))

    @classmethod
    def load(cls, path: Path) -> "StageReport":
        return cls(**json.loads(path.read_text()))


@dataclass
class StageResult:
    row_counts: dict[str, int]
    stats: dict[str, Any] = field(default_factory=dict)
    manifest_fields: dict[str, Any] = field(default_factory=dict)  # stage-specific manifest fields
    report: StageReport = field(default_factory=StageReport)
    # Output files other machines published to the store's work folder and this one never downloaded
    # (a sharded cache's chunks on object storage), by published name: committed by a copy on the store.
    published: dict[str, FileEntry] = field(default_factory=dict)


@dataclass
class StageContext:
    stage: str
    cfg: PipelineConfig
    store: ArtifactStore
    upstream: dict[str, StageManifest]
    work: Path
    fingerprint: str
    log: logging.Logger
    progress: ProgressFn
    shard_results: list[dict[str, Any]] = field(default_factory=list)
    # The caller spreads this stage's shards over a cluster runner's workers (Dask, Ray): stages that shard
    # only for a cluster (ingest's downloads, cache's chunks) plan shards and merge them then. The flow
    # decides it from its runner; stage code never asks which runner is configured.
    sharded: bool = False

    @property
    def section(self) -> Any:
        """This stage's own config section."""
        return getattr(self.cfg, self.stage)


@dataclass
class StageSpec:
    name: str
    upstream: tuple[str, ...]
    code_version: str
    build: Callable[[StageContext], StageResult]
    resumable: bool = False  # keep the work folder across kills (the stage journals its progress)
    gpu: bool = False  # may use a GPU: runs under the GPU concurrency limit when its device is not the CPU
    # What else decides the output besides the config section (e.g. sha256 of a model file the
    # config only names by path): hashed into the fingerprint so a changed file reruns the stage.
    fingerprint_extra: Callable[[PipelineConfig], dict[str, Any]] | None = None
    # Optional: a complete output that a run which is not forced uses instead of the one its fingerprint names,
    # given (cfg, store, fingerprint); None: none. Ingest: the newest snapshot of the config's crawl (an update).
    superseded_by: Callable[[PipelineConfig, ArtifactStore, str], str | None] | None = None
    # Optional sharding: plan_shards(ctx) -> JSON-able shard descriptions; run_shard(ctx, shard) does one
    # (idempotent, writing under ctx.work) and returns a JSON-able summary; build(ctx) then merges, with
    # the summaries in ctx.shard_results. The flow maps run_shard over Prefect's task runner (threads,
    # Dask, Ray); run_stage alone runs the shards in order.
    plan_shards: Callable[[StageContext], list[dict[str, Any]]] | None = None
    run_shard: Callable[[StageContext, dict[str, Any]], dict[str, Any]] | None = None
    # Optional: worker processes the shards should be spread over (one per GPU), given the shard count.
    # More than one slot: run_stage and the flow's thread runner start one process per slot
    # (tasks/common/shard_workers.py) instead of running shards in this process.
    shard_slots: Callable[[StageContext, int], list[WorkerSlot]] | None = None


@dataclass
class StageOutcome:
    manifest: StageManifest
    cached: bool
    report: StageReport
    output_path: str
    seconds: float


def _noop_progress(fraction: float, message: str) -> None:
    pass


def upstream_manifests(spec: StageSpec, store: ArtifactStore) -> dict[str, StageManifest]:
    """The current output of each upstream stage, validated against this code's contracts."""
    return {name: store.read_manifest(manifest_class(name)) for name in spec.upstream}


def compute_fingerprint(spec: StageSpec, cfg: PipelineConfig, upstream: dict[str, StageManifest]) -> str:
    cls = manifest_class(spec.name)
    section = section_dict(cfg, spec.name)
    if spec.fingerprint_extra is not None:
        section = {**section, "_extra": spec.fingerprint_extra(cfg)}
    # Upstreams by what they hold, not only by how they were made: a forced rebuild that produced other
    # data (a pool image gone, another GPU's rounding) gives every downstream stage a new fingerprint.
    return stage_fingerprint(
        spec.name,
        cls.CONTRACT_VERSION,
        section,
        {name: content_id(m) for name, m in upstream.items()},
        spec.code_version,
    )


def is_cached(spec: StageSpec, cfg: PipelineConfig, store: ArtifactStore) -> bool:
    """A complete output for this config already exists (cheap: manifests and fingerprint only)."""
    try:
        upstream = upstream_manifests(spec, store)
    except (ContractError, OSError):
        return False
    fp = compute_fingerprint(spec, cfg, upstream)
    return store.is_complete(spec.name, fp) or newer_output(spec, cfg, store, fp) is not None


def newer_output(spec: StageSpec, cfg: PipelineConfig, store: ArtifactStore, fingerprint: str) -> str | None:
    """The complete output that supersedes `fingerprint`'s for a run that is not forced (StageSpec.superseded_by)."""
    if spec.superseded_by is None:
        return None
    newer = spec.superseded_by(cfg, store, fingerprint)
    return newer if newer is not None and newer != fingerprint and store.is_complete(spec.name, newer) else None


def load_report(store: ArtifactStore, manifest: StageManifest) -> StageReport:
    try:
        return StageReport.load(store.path(manifest, REPORT_NAME))
    except ContractError:
        return StageReport(summary_md=f"{manifest.stage} {manifest.fingerprint} (no report)")


@dataclass
class PreparedStage:
    spec: StageSpec
    ctx: StageContext
    started: float
    cached: StageOutcome | None  # set when a complete output with this fingerprint exists
    force: bool = False  # a forced rebuild: its commit replaces a complete output of the same fingerprint


def prepare_stage(
    spec: StageSpec,
    cfg: PipelineConfig,
    store: ArtifactStore,
    *,
    force: bool = False,
    progress: ProgressFn = _noop_progress,
    log: logging.Logger | None = None,
    sharded: bool = False,
) -> PreparedStage:
    """Resolve upstream outputs and the fingerprint; reuse a complete output or open the work folder.
    `sharded`: see StageContext.sharded."""
    log = log or logging.getLogger(f"booruflow.{spec.name}")
    started = time.monotonic()
    upstream = upstream_manifests(spec, store)
    fp = compute_fingerprint(spec, cfg, upstream)
    store.clean_incomplete(spec.name, keep={fp})
    newer = None if force else newer_output(spec, cfg, store, fp)
    if newer is not None:
        log.info("%s: using %s instead of %s: the newest snapshot of this config's output (--force builds %s "
                 "again)", spec.name, newer, fp, fp)
        fp = newer
    if store.is_complete(spec.name, fp) and not force:
        manifest = store.read_manifest(manifest_class(spec.name), fp)
        store.set_current(spec.name, fp)
        log.info("%s: cached output %s", spec.name, fp)
        outcome = StageOutcome(manifest, True, load_report(store, manifest), store.output_url(spec.name, fp), 0.0)
        ctx = StageContext(spec.name, cfg, store, upstream, store.work_dir(spec.name, fp), fp, log, progress,
                           sharded=sharded)
        return PreparedStage(spec, ctx, started, outcome)
    work = store.begin(spec.name, fp, resume=spec.resumable and not force)
    log.info("%s: building %s in %s", spec.name, fp, work)
    ctx = StageContext(spec.name, cfg, store, upstream, work, fp, log, progress, sharded=sharded)
    return PreparedStage(spec, ctx, started, None, force)


def reopen_stage(
    spec: StageSpec,
    cfg: PipelineConfig,
    store: ArtifactStore,
    fingerprint: str,
    *,
    log: logging.Logger | None = None,
    force: bool = False,
    sharded: bool = False,
) -> PreparedStage:
    """The context of a stage prepared elsewhere (another task or worker): same work folder, no wipe."""
    log = log or logging.getLogger(f"booruflow.{spec.name}")
    upstream = upstream_manifests(spec, store)
    fp = compute_fingerprint(spec, cfg, upstream)
    if fp != fingerprint:
        raise StageError(
            f"{spec.name}: upstream outputs changed while the stage ran (fingerprint {fingerprint} -> {fp}); rerun it"
        )
    work = store.work_dir(spec.name, fp)
    work.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(spec.name, cfg, store, upstream, work, fp, log, _noop_progress, sharded=sharded)
    return PreparedStage(spec, ctx, time.monotonic(), None, force)


def plan_shards(prepared: PreparedStage) -> list[dict[str, Any]]:
    if prepared.cached is not None or prepared.spec.plan_shards is None:
        return []
    return prepared.spec.plan_shards(prepared.ctx)


def worker_slots(prepared: PreparedStage, n_shards: int) -> list[WorkerSlot]:
    """The worker processes the stage's shards should run in; [] = run them in this process."""
    if prepared.cached is not None or prepared.spec.shard_slots is None or n_shards == 0:
        return []
    slots = prepared.spec.shard_slots(prepared.ctx, n_shards)
    return slots if len(slots) > 1 else []


def finish_stage(prepared: PreparedStage, shard_results: list[dict[str, Any]] | None = None) -> StageOutcome:
    """Merge (build), write the report, commit the manifest last."""
    if prepared.cached is not None:
        return prepared.cached
    spec, ctx = prepared.spec, prepared.ctx
    ctx.shard_results = shard_results or []
    result = spec.build(ctx)
    result.report.save(ctx.work)
    cls = manifest_class(spec.name)
    manifest = cls(
        stage=spec.name,
        contract_version=cls.CONTRACT_VERSION,
        fingerprint=ctx.fingerprint,
        upstream={name: m.fingerprint for name, m in ctx.upstream.items()},
        config_digest=digest(section_dict(ctx.cfg, spec.name)),
        code_version=spec.code_version,
        row_counts=result.row_counts,
        stats=result.stats,
        **result.manifest_fields,
    )
    manifest = ctx.store.commit(manifest, ctx.work, published=result.published, replace=prepared.force)
    seconds = time.monotonic() - prepared.started
    ctx.log.info("%s: wrote %s in %.1fs", spec.name, ctx.fingerprint, seconds)
    return StageOutcome(manifest, False, result.report, ctx.store.output_url(spec.name, ctx.fingerprint), seconds)


def run_stage(
    spec: StageSpec,
    cfg: PipelineConfig,
    store: ArtifactStore,
    *,
    force: bool = False,
    progress: ProgressFn = _noop_progress,
    log: logging.Logger | None = None,
    sharded: bool = False,
) -> StageOutcome:
    """Run one stage start to finish in this process (shards, if any, one after another), holding the
    stage's lock on the data root (a second run waits for it). `sharded`: plan and merge the stage as a
    cluster runner would (StageContext.sharded), its shards run here."""
    with StageLock(store, spec.name, log=log or logging.getLogger(f"booruflow.{spec.name}")):
        return _run_stage_locked(spec, cfg, store, force=force, progress=progress, log=log, sharded=sharded)


def _run_stage_locked(spec: StageSpec, cfg: PipelineConfig, store: ArtifactStore, *, force: bool,
                      progress: ProgressFn, log: logging.Logger | None, sharded: bool) -> StageOutcome:
    prepared = prepare_stage(spec, cfg, store, force=force, progress=progress, log=log, sharded=sharded)
    shards = plan_shards(prepared)
    slots = worker_slots(prepared, len(shards))
    if slots:
        done: list[int] = []

        def on_shard(summary: dict[str, Any]) -> None:
            done.append(1)
            progress(len(done) / len(shards), f"shard {len(done)}/{len(shards)} ({len(slots)} workers)")

        # This process takes part on the first slot's device (its model loads at once); workers take the rest.
        results = run_in_workers(spec.name, cfg.model_dump(mode="json"), prepared.ctx.fingerprint, shards,
                                 slots[1:], log=prepared.ctx.log, on_shard=on_shard,
                                 local=lambda shard: spec.run_shard(prepared.ctx, shard),  # type: ignore[misc]
                                 sharded=sharded)
        return finish_stage(prepared, results)
    results = []
    for i, shard in enumerate(shards):
        results.append(spec.run_shard(prepared.ctx, shard))  # type: ignore[misc]
        progress((i + 1) / max(1, len(shards)), f"shard {i + 1}/{len(shards)}")
    return finish_stage(prepared, results)
