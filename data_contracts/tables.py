"""Arrow/Parquet helpers that enforce the contract schemas on write and on read."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_contracts.errors import ContractError

# Every stage's rejects table: one row per bad input item, with a reason code and readable detail.
REJECTS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
    ]
)


def schema_diff(expected: pa.Schema, found: pa.Schema) -> str | None:
    """First difference as 'field X: expected T, found U', or None when the schemas agree."""
    found_by_name = {f.name: f for f in found}
    for field in expected:
        other = found_by_name.get(field.name)
        if other is None:
            return f"field {field.name!r}: expected {field.type}, found (missing)"
        if not other.type.equals(field.type):
            return f"field {field.name!r}: expected {field.type}, found {other.type}"
    extra = [f.name for f in found if f.name not in {e.name for e in expected}]
    if extra:
        return f"field {extra[0]!r}: expected (absent), found {found_by_name[extra[0]].type}"
    return None


def check_schema(found: pa.Schema, expected: pa.Schema, where: str) -> None:
    diff = schema_diff(expected, found)
    if diff:
        raise ContractError(f"{where}: {diff} — the file does not match the contract schema")


def write_table(table: pa.Table, path: Path, schema: pa.Schema, row_group_size: int | None = None) -> int:
    """Cast to the contract schema and write atomically (temp + rename). Returns bytes written."""
    try:
        table = table.select(schema.names).cast(schema)
    except (KeyError, pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise ContractError(f"{path}: table does not fit the contract schema: {exc}") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    pq.write_table(table, tmp, row_group_size=row_group_size, compression="zstd")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path.stat().st_size


def rows_to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


def read_table(path: Path, schema: pa.Schema, where: str | None = None, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet file and check its schema against the contract first."""
    label = where or str(path)
    try:
        found = pq.read_schema(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ContractError(f"{label}: not a readable Parquet file ({exc})") from exc
    check_schema(found, schema, label)
    return pq.read_table(path, columns=columns)
