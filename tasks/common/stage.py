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

from data_contracts.errors import ContractError
from data_contracts.fingerprint import digest, stage_fingerprint
from data_contracts.manifest import StageManifest
from data_contracts.registry import manifest_class
from data_contracts.store import ArtifactStore
from pipeline_config.load import section_dict
from pipeline_config.schema import PipelineConfig

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
    return stage_fingerprint(
        spec.name,
        cls.CONTRACT_VERSION,
        section_dict(cfg, spec.name),
        {name: m.fingerprint for name, m in upstream.items()},
        spec.code_version,
    )


def load_report(store: ArtifactStore, manifest: StageManifest) -> StageReport:
    try:
        return StageReport.load(store.path(manifest, REPORT_NAME))
    except ContractError:
        return StageReport(summary_md=f"{manifest.stage} {manifest.fingerprint} (no report)")


def run_stage(
    spec: StageSpec,
    cfg: PipelineConfig,
    store: ArtifactStore,
    *,
    force: bool = False,
    progress: ProgressFn = _noop_progress,
    log: logging.Logger | None = None,
) -> StageOutcome:
    log = log or logging.getLogger(f"booruflow.{spec.name}")
    started = time.monotonic()
    upstream = upstream_manifests(spec, store)
    fp = compute_fingerprint(spec, cfg, upstream)
    cls = manifest_class(spec.name)
    store.clean_incomplete(spec.name, keep={fp})
    if store.is_complete(spec.name, fp) and not force:
        manifest = store.read_manifest(cls, fp)
        store.set_current(spec.name, fp)
        log.info("%s: cached output %s", spec.name, fp)
        return StageOutcome(manifest, True, load_report(store, manifest), store.output_url(spec.name, fp), 0.0)

    work = store.begin(spec.name, fp, resume=spec.resumable and not force)
    ctx = StageContext(spec.name, cfg, store, upstream, work, fp, log, progress)
    log.info("%s: building %s in %s", spec.name, fp, work)
    result = spec.build(ctx)
    result.report.save(work)
    manifest = cls(
        stage=spec.name,
        contract_version=cls.CONTRACT_VERSION,
        fingerprint=fp,
        upstream={name: m.fingerprint for name, m in upstream.items()},
        config_digest=digest(section_dict(cfg, spec.name)),
        code_version=spec.code_version,
        row_counts=result.row_counts,
        stats=result.stats,
        **result.manifest_fields,
    )
    manifest = store.commit(manifest, work)
    seconds = time.monotonic() - started
    log.info("%s: wrote %s in %.1fs", spec.name, fp, seconds)
    return StageOutcome(manifest, False, result.report, store.output_url(spec.name, fp), seconds)
