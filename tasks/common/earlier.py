"""Earlier outputs of a stage that a new run may take work from (after an ingest update, the later stages keep what
still holds: tag rows, dedup hashes, cache latents) or extend (an update extends the newest crawl)."""
from __future__ import annotations

from typing import TypeVar

from data_contracts.errors import BooruflowError
from data_contracts.manifest import MANIFEST_NAME, StageManifest
from data_contracts.store import ArtifactStore

M = TypeVar("M", bound=StageManifest)


def complete_outputs(store: ArtifactStore, cls: type[M], exclude: str | None = None) -> list[M]:
    """Every complete output of the stage `cls` describes that this code's contract reads, in path order, except
    the fingerprint `exclude`; another contract version or a broken manifest is skipped, never an error."""
    found = []
    for path in sorted(store.fs.glob(f"{store.output_path(cls.STAGE, '*')}/{MANIFEST_NAME}")):
        fingerprint = str(path).rstrip("/").split("/")[-2]
        if fingerprint == exclude or fingerprint.startswith((".", "_")):
            continue
        try:
            found.append(store.read_manifest(cls, fingerprint))
        except BooruflowError:
            continue
    return found


def current_then_newest(store: ArtifactStore, found: list[M]) -> list[M]:
    """`found` ordered as a source to take work from: the stage's current output first, then the newest."""
    current = store.current(found[0].stage) if found else None
    return sorted(found, key=lambda m: (m.fingerprint == current, m.created_at), reverse=True)
