"""Reading an upstream stage's tables through its manifest (schema-checked, shard-aware)."""
from __future__ import annotations

import pyarrow as pa

from data_contracts.errors import ContractError
from data_contracts.manifest import StageManifest
from data_contracts.store import ArtifactStore
from data_contracts.tables import read_table


def read_upstream(
    store: ArtifactStore, manifest: StageManifest, name: str, schema: pa.Schema, columns: list[str]
) -> pa.Table:
    """`<name>.parquet`, or every `<name>/*.parquet` shard, of an upstream output (schema-checked)."""
    listed = {f.path for f in manifest.files}
    if f"{name}.parquet" in listed:
        rels = [f"{name}.parquet"]
    else:
        rels = sorted(f.path for f in manifest.files_under(f"{name}/") if f.path.endswith(".parquet"))
    if not rels:
        raise ContractError(
            f"{manifest.stage}/{manifest.fingerprint}: manifest lists no {name}.parquet (nor {name}/*.parquet); "
            f"rerun `fm run {manifest.stage}`"
        )
    parts = [
        read_table(store.path(manifest, rel), schema, f"{manifest.stage}/{manifest.fingerprint}/{rel}", columns)
        for rel in rels
    ]
    return pa.concat_tables(parts)
