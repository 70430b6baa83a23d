"""Chunk plan, chunk writer and the journal that makes caching resumable exactly once.

The plan is a pure function of the samples table (sorted by bucket, id) and the config: chunk n of a
bucket always holds the same samples, so a rerun after a kill redoes exactly the chunks that were not
journalled. A chunk is written to a temp file, fsynced, renamed into place, and only then journalled;
a chunk file without a journal line is rewritten (the rename made it whole, but the journal is the
commit), a journal line whose file is missing or of another size is ignored.
"""
from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_contracts.cache import CHUNK_SCHEMA, ChunkInfo
from data_contracts.errors import ContractError
from tasks.common.journal import Journal, read_records

CHUNKS_DIR = "chunks"
JOURNAL_GLOB = "_journal*.jsonl"
_ROW_OVERHEAD = 768  # bytes per row besides latents (ids, tags, token lists), for size planning only
LATENT_COLUMNS = ("latent_mean", "latent_std")


@dataclass(frozen=True)
class ChunkPlan:
    bucket: tuple[int, int]
    index: int  # part number within the bucket
    start: int  # row range in the samples table
    stop: int
    row_group_rows: int
    key: str  # digest of the sample ids: a journal line counts only for the same samples

    @property
    def path(self) -> str:
        w, h = self.bucket
        return f"{CHUNKS_DIR}/bucket={w}x{h}/part-{self.index:05d}.parquet"

    @property
    def bucket_name(self) -> str:
        return f"{self.bucket[0]}x{self.bucket[1]}"


def latent_row_bytes(bucket: tuple[int, int], channels: int, downscale: int, store_std: bool) -> int:
    w, h = bucket
    one = channels * (h // downscale) * (w // downscale) * 2  # fp16
    return one * (2 if store_std else 1)


def plan_chunks(ids: np.ndarray, bucket_w: np.ndarray, bucket_h: np.ndarray, *, channels: int, downscale: int,
                store_std: bool, chunk_bytes: float, row_group_bytes: float) -> list[ChunkPlan]:
    """Contiguous, balanced chunks per bucket (input sorted by bucket then id)."""
    plans: list[ChunkPlan] = []
    n = len(ids)
    start = 0
    while start < n:
        bucket = (int(bucket_w[start]), int(bucket_h[start]))
        stop = start
        while stop < n and (bucket_w[stop], bucket_h[stop]) == bucket:
            stop += 1
        row = latent_row_bytes(bucket, channels, downscale, store_std) + _ROW_OVERHEAD
        per_chunk = max(1, int(chunk_bytes // row))
        per_group = max(1, min(per_chunk, int(row_group_bytes // row)))
        count = stop - start
        parts = -(-count // per_chunk)
        sizes = [count // parts + (1 if i < count % parts else 0) for i in range(parts)]
        pos = start
        for index, size in enumerate(sizes):
            key = hashlib.sha256(np.ascontiguousarray(ids[pos : pos + size], dtype=np.int64).tobytes()).hexdigest()[:16]
            plans.append(ChunkPlan(bucket, index, pos, pos + size, min(per_group, size), key))
            pos += size
        start = stop
    return plans


# ------------------------------------------------------------------------------------------ journal

def read_journal(work: Path) -> dict[str, dict]:
    """path -> journal entry, for entries whose file is still there with the journalled size."""
    done: dict[str, dict] = {}
    for jpath in sorted(work.glob(JOURNAL_GLOB)):
        for entry in read_records(jpath):  # a line cut by a kill ends the read: that chunk is redone
            f = work / entry["path"]
            if entry["rows"] == 0 or (f.is_file() and f.stat().st_size == entry["bytes"]):
                done[entry["path"]] = entry
    return done


def is_done(plan: ChunkPlan, done: dict[str, dict]) -> bool:
    entry = done.get(plan.path)
    return entry is not None and entry.get("key") == plan.key


def append_journal(path: Path, entry: dict) -> None:
    """Journal a written chunk (fsynced: a chunk costs seconds of GPU time to redo)."""
    with Journal(path) as journal:  # opening cuts a torn line a kill left, so this record starts clean
        journal.append(entry, sync=True)


def clean_temp(work: Path) -> None:
    """Temp files of chunks a kill interrupted (never renamed, never journalled)."""
    for tmp in (work / CHUNKS_DIR).rglob(".*.tmp") if (work / CHUNKS_DIR).exists() else []:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------- writer

def latent_array(latents: np.ndarray) -> pa.Array:
    """[n, ...] fp16 -> binary array, one value per row, without copying the bytes."""
    n = latents.shape[0]
    if n == 0:
        return pa.array([], pa.binary())
    flat = np.ascontiguousarray(latents, dtype=np.float16).reshape(n, -1)
    width = flat.shape[1] * 2
    offsets = np.arange(0, (n + 1) * width, width, dtype=np.int32)
    return pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(flat)])


def chunk_table(meta: pa.Table, mean: np.ndarray, std: np.ndarray | None) -> pa.Table:
    """The contract table of one chunk from the samples rows (meta) and their latents."""
    n = meta.num_rows
    cols = {
        "id": meta.column("id"),
        "bucket_w": meta.column("bucket_w"),
        "bucket_h": meta.column("bucket_h"),
        "flip": meta.column("flip"),
        "latent_mean": latent_array(mean),
        "latent_std": latent_array(std) if std is not None else pa.nulls(n, pa.binary()),
        "quality_label": meta.column("quality_label"),
        "tag_weight": meta.column("tag_weight"),
    }
    for name in CHUNK_SCHEMA.names:
        if name.startswith(("tags_", "tokens_")):
            cols[name] = meta.column(name)
    table = pa.table(cols)
    try:
        return table.select(CHUNK_SCHEMA.names).cast(CHUNK_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ContractError(f"chunk table does not fit the cache contract schema: {exc}") from exc


def write_chunk(work: Path, plan: ChunkPlan, table: pa.Table) -> ChunkInfo:
    """Atomic write (temp, fsync, rename) of one chunk; returns its size, sha256 and row groups.

    A chunk whose every image was rejected writes no file (rows 0)."""
    if table.num_rows == 0:
        return ChunkInfo(path=plan.path, bucket=plan.bucket_name, rows=0)
    sink = pa.BufferOutputStream()
    # Latents are near-incompressible fp16 noise: store them plain so the reader only memcpys;
    # tags and token lists compress well.
    compression = {name: ("none" if name in LATENT_COLUMNS else "zstd") for name in CHUNK_SCHEMA.names}
    pq.write_table(table, sink, row_group_size=plan.row_group_rows, compression=compression,
                   use_dictionary=[n for n in CHUNK_SCHEMA.names if n.startswith("tags_") or n == "quality_label"],
                   write_statistics=["id"])
    data = sink.getvalue()
    final = work / plan.path
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    meta = pq.read_metadata(pa.BufferReader(data))
    groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    return ChunkInfo(path=plan.path, bucket=plan.bucket_name, rows=table.num_rows, bytes=len(data),
                     sha256=hashlib.sha256(data).hexdigest(), row_groups=groups)


def journal_entry(plan: ChunkPlan, info: ChunkInfo, rejects: Iterable[dict]) -> dict:
    return {**info.model_dump(), "key": plan.key, "rejects": list(rejects)}
