"""Which output an update extends, and the identity (fingerprint part) of an update.

A config's from-scratch crawl is the root of a lineage; every `fm run ingest --update` adds an output that
extends the newest member (by snapshot time, the root included: a forced re-crawl is newer than the updates
before it). An update's fingerprint holds the plain fingerprint's parts plus {"update": identity}: the content
id and snapshot of the output it extends and the update settings. So a killed update resumes its own work
folder (the newest member has not changed until it commits), and the next update after a commit extends it.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Callable

from data_contracts.fingerprint import content_id
from data_contracts.ingest import IngestManifest
from data_contracts.store import ArtifactStore
from pipeline_config.schema import PipelineConfig
from tasks.common.earlier import complete_outputs


def plain(cfg: PipelineConfig) -> PipelineConfig:
    """The config with update mode off: what a from-scratch crawl of it is keyed by."""
    if not cfg.ingest.update.enabled:
        return cfg
    out = cfg.model_copy(deep=True)
    out.ingest.update.enabled = False
    return out


def members(store: ArtifactStore, root: str) -> list[IngestManifest]:
    """Every complete ingest output of the lineage `root` (its from-scratch crawl and the updates on it)."""
    return [m for m in complete_outputs(store, IngestManifest) if m.fingerprint == root or m.lineage() == root]


def newest(store: ArtifactStore, root: str) -> IngestManifest | None:
    """The member with the latest snapshot (None: nothing of this lineage exists yet)."""
    found = members(store, root)
    return max(found, key=lambda m: (m.snapshot(), m.created_at)) if found else None


def identity(base: IngestManifest, cfg: PipelineConfig) -> dict[str, Any]:
    """The fingerprint part of an update extending `base` (content id: a forced rebuild of base with other data
    is another base; its snapshot: a re-crawl with the same data is too)."""
    return {"extends": content_id(base), "base_snapshot": base.snapshot().isoformat(),
            "settings": cfg.ingest.update.identity()}


def update_extra(cfg: PipelineConfig, plain_fingerprint: Callable[[PipelineConfig], str]) -> dict[str, Any]:
    """{"update": identity} of the update this config asks for; {} when there is nothing to extend yet (the
    update is then the from-scratch crawl itself, under its own fingerprint)."""
    base = newest(ArtifactStore.for_config(cfg), plain_fingerprint(plain(cfg)))
    return {"update": identity(base, cfg)} if base is not None else {}


def snapshot_text(when: datetime) -> str:
    return when.isoformat(timespec="seconds")
