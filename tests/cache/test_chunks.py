"""Chunk plan, writer and journal (the exactly-once bookkeeping), without a VAE."""
from __future__ import annotations

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from data_contracts.cache import CHUNK_SCHEMA
from data_contracts.store import ArtifactStore
from tasks.cache.chunks import append_journal, is_done, plan_chunks, read_journal
from tests.cache.data import make_cache


def _plan(n_a: int, n_b: int, chunk_bytes: float):
    ids = np.arange(n_a + n_b)
    bw = np.array([64] * n_a + [128] * n_b)
    bh = np.array([64] * (n_a + n_b))
    return plan_chunks(ids, bw, bh, channels=4, downscale=8, store_std=True, chunk_bytes=chunk_bytes,
                       row_group_bytes=chunk_bytes / 3)


def test_plan_is_contiguous_balanced_and_keyed_by_ids():
    row_64 = 4 * 8 * 8 * 2 * 2 + 768
    plans = _plan(25, 7, chunk_bytes=row_64 * 10)
    # 10 rows of 64x64 fit a chunk (25 -> 9, 8, 8); a 128x64 row is larger: 6 fit (7 -> 4, 3)
    assert [(p.bucket, p.stop - p.start) for p in plans] == [((64, 64), 9), ((64, 64), 8), ((64, 64), 8),
                                                           ((128, 64), 4), ((128, 64), 3)]
    assert plans[0].start == 0 and all(a.stop == b.start for a, b in zip(plans, plans[1:])) and plans[-1].stop == 32
    assert plans[0].path == "chunks/bucket=64x64/part-00000.parquet"
    assert plans[4].path == "chunks/bucket=128x64/part-00001.parquet"
    assert all(1 <= p.row_group_rows <= p.stop - p.start for p in plans)
    assert [p.key for p in _plan(25, 7, row_64 * 10)] == [p.key for p in plans]  # deterministic
    shifted = plan_chunks(np.arange(1, 33), np.array([64] * 25 + [128] * 7), np.full(32, 64), channels=4, downscale=8,
                          store_std=True, chunk_bytes=row_64 * 10, row_group_bytes=row_64)
    assert shifted[0].key != plans[0].key  # other samples: a journal line for the old ones does not count


def test_journal_ignores_cut_lines_and_missing_or_resized_files(tmp_path):
    store = ArtifactStore(str(tmp_path / "root"))
    manifest = make_cache(store, {(64, 64): 6}, rows_per_chunk=2)
    folder = store.path(manifest, manifest.chunks[0].path).parents[2]
    journal = folder / "_journal-0.jsonl"
    plans = _plan(6, 0, chunk_bytes=(4 * 8 * 8 * 4 + 768) * 2)
    for plan, chunk in zip(plans, manifest.chunks):
        append_journal(journal, {**chunk.model_dump(), "key": plan.key, "rejects": []})
    assert all(is_done(p, read_journal(folder)) for p in plans)
    # a kill mid-append leaves a cut last line: that chunk is redone, the others stay done
    text = journal.read_text().splitlines()
    journal.write_text("\n".join(text[:-1]) + "\n" + text[-1][: len(text[-1]) // 2])
    done = read_journal(folder)
    assert [is_done(p, done) for p in plans] == [True, True, False]
    # a chunk file that went missing or changed size is not done either
    (folder / plans[0].path).unlink()
    with open(folder / plans[1].path, "ab") as fh:
        fh.write(b"x")
    done = read_journal(folder)
    assert [is_done(p, done) for p in plans] == [False, False, False]


def test_chunks_are_hive_partitioned_parquet_with_the_contract_schema(tmp_path):
    store = ArtifactStore(str(tmp_path / "root"))
    manifest = make_cache(store, {(64, 64): 9, (128, 64): 5}, rows_per_chunk=4, rows_per_group=2)
    first = store.path(manifest, manifest.chunks[0].path)
    meta = pq.read_metadata(first)
    assert pq.read_schema(first).remove_metadata().equals(CHUNK_SCHEMA)
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == manifest.chunks[0].row_groups == [2, 2]
    root = first.parents[1]
    dataset = ds.dataset(root, format="parquet", partitioning="hive")
    table = dataset.to_table(columns=["id", "bucket"])
    counts = {}
    for b in table.column("bucket").to_pylist():
        counts[b] = counts.get(b, 0) + 1
    assert counts == {"64x64": 9, "128x64": 5}
    for chunk in manifest.chunks:  # the chunk list agrees with the store's own file list
        entry = manifest.file(chunk.path)
        assert (chunk.sha256, chunk.bytes) == (entry.sha256, entry.size)
