"""Test helpers: commit a hand-made upstream output through the real store (real Parquet, real manifest)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from data_contracts.fingerprint import digest
from data_contracts.manifest import StageManifest
from data_contracts.store import ArtifactStore
from data_contracts.tables import write_table


def commit_output(
    store: ArtifactStore,
    cls: type[StageManifest],
    tables: dict[str, tuple[pa.Table, pa.Schema]],
    *,
    fields: dict[str, Any] | None = None,
    upstream: dict[str, str] | None = None,
    files: dict[str, bytes] | None = None,
    fingerprint: str | None = None,
) -> StageManifest:
    """Write tables (relpath -> (table, schema)) and extra files as a complete output of cls.STAGE."""
    fp = fingerprint or digest({"tables": sorted(tables), "n": [t.num_rows for t, _ in tables.values()],
                                "fields": fields or {}})
    work = store.begin(cls.STAGE, fp, resume=False)
    for rel, (table, schema) in tables.items():
        write_table(table, work / rel, schema)
    for rel, data in (files or {}).items():
        path = work / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    manifest = cls(
        stage=cls.STAGE,
        contract_version=cls.CONTRACT_VERSION,
        fingerprint=fp,
        upstream=upstream or {},
        config_digest="test",
        code_version="test",
        row_counts={Path(rel).stem: t.num_rows for rel, (t, _) in tables.items()},
        **(fields or {}),
    )
    return store.commit(manifest, work)
