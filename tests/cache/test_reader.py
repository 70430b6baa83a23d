"""The streaming reader: coverage across ranks, determinism, resume, content, integrity errors."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from data_contracts.cache import SEGMENTS
from data_contracts.errors import ConfigError, ContractError
from data_contracts.store import ArtifactStore
from tasks.cache.reader import ChunkReader
from tests.cache.data import make_cache

SIZES = {(64, 64): 37, (128, 64): 23, (64, 128): 12}  # 72 samples, uneven buckets


@pytest.fixture()
def cache(tmp_path):
    store = ArtifactStore(str(tmp_path / "root"))
    return store, make_cache(store, SIZES)


def _ids(batches) -> list[list[int]]:
    return [b["id"].tolist() for b in batches]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_sample_once_per_epoch_across_ranks(cache, world):
    store, manifest = cache
    bs = 4
    readers = [ChunkReader(manifest, store, batch_size=bs, seed=7, rank=r, world_size=world, shuffle_buffer=16)
               for r in range(world)]
    for epoch in (0, 1):
        per_rank = []
        for reader in readers:
            reader.set_epoch(epoch)
            per_rank.append(list(reader))
        steps = readers[0].steps_per_epoch()
        assert all(len(b) == steps for b in per_rank)  # same number of batches: DDP never waits on a rank
        g = bs * world
        assert steps == sum(n // g for n in SIZES.values())
        for step in range(steps):  # same bucket on every rank at a step, full batches
            assert len({per_rank[r][step]["bucket"] for r in range(world)}) == 1
            assert all(len(per_rank[r][step]["id"]) == bs for r in range(world))
        seen = Counter(i for batches in per_rank for ids in _ids(batches) for i in ids)
        assert max(seen.values()) == 1  # no overlap between ranks, no repeats
        # drop_last: only each bucket's remainder (< batch * world) is left out
        all_ids = _all_ids(manifest, store)
        assert len(all_ids) - len(seen) == sum(n % g for n in SIZES.values())
        assert set(seen) <= all_ids


def _all_ids(manifest, store) -> set[int]:
    import pyarrow.parquet as pq

    return {i for c in manifest.chunks for i in pq.read_table(store.path(manifest, c.path), columns=["id"])
            .column("id").to_pylist()}


@pytest.mark.parametrize("world", [1, 2, 3])
def test_keep_last_covers_everything(cache, world):
    store, manifest = cache
    readers = [ChunkReader(manifest, store, batch_size=5, seed=1, rank=r, world_size=world, drop_last=False)
               for r in range(world)]
    per_rank = [list(r) for r in readers]
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == readers[0].steps_per_epoch()
    seen = Counter(i for batches in per_rank for ids in _ids(batches) for i in ids)
    assert set(seen) == _all_ids(manifest, store)
    # only padding of a bucket's last partial batch repeats rows (fewer than world per bucket)
    assert sum(seen.values()) - len(seen) < world * len(SIZES)


def test_order_depends_on_seed_and_epoch_only(cache):
    store, manifest = cache
    a = ChunkReader(manifest, store, batch_size=4, seed=3, shuffle_buffer=8)
    b = ChunkReader(manifest, store, batch_size=4, seed=3, shuffle_buffer=8, prefetch=1)
    e0 = _ids(a)
    assert e0 == _ids(b)
    a.set_epoch(1)
    assert _ids(a) != e0
    c = ChunkReader(manifest, store, batch_size=4, seed=4, shuffle_buffer=8)
    assert _ids(c) != e0
    # shuffled across chunks, not only within them: batches mix chunk files
    assert any(max(ids) - min(ids) >= 10 for ids in e0)


def test_resume_mid_epoch_gives_the_remaining_batches(cache):
    store, manifest = cache
    full = ChunkReader(manifest, store, batch_size=3, seed=5, rank=1, world_size=2, shuffle_buffer=10)
    full.set_epoch(2)
    expected = list(full)
    first = ChunkReader(manifest, store, batch_size=3, seed=5, rank=1, world_size=2, shuffle_buffer=10)
    first.set_epoch(2)
    it = iter(first)
    head = [next(it) for _ in range(4)]
    state = first.state_dict()
    it.close()
    assert state["epoch"] == 2 and state["batches"] == 4
    resumed = ChunkReader(manifest, store, batch_size=3, seed=5, rank=1, world_size=2, shuffle_buffer=10)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the trainer's epoch loop calls this again: the offset survives
    rest = list(resumed)
    assert _ids(head + rest) == _ids(expected)
    for got, want in zip(head + rest, expected):
        assert torch.equal(got["latent_mean"], want["latent_mean"])
    assert resumed.state_dict()["batches"] == len(expected)
    resumed.set_epoch(3)
    assert len(list(resumed)) == resumed.steps_per_epoch()
    other = ChunkReader(manifest, store, batch_size=3, seed=5, rank=0, world_size=3)
    with pytest.raises(ConfigError, match="world_size"):
        other.load_state_dict(state)


def test_batch_content(cache):
    store, manifest = cache
    reader = ChunkReader(manifest, store, batch_size=4, seed=0)
    for batch in reader:
        w, h = batch["bucket"]
        ids = batch["id"]
        assert batch["latent_mean"].shape == (4, 4, h // 8, w // 8) and batch["latent_mean"].dtype == torch.float32
        assert torch.equal(batch["latent_mean"][:, 0, 0, 0], ids.float())
        torch.testing.assert_close(batch["latent_std"][:, 1, -1, -1], ids.float() / 1000, rtol=1e-3, atol=0)
        torch.testing.assert_close(batch["tag_weight"], (ids % 7 + 1).float() / 4)
        for seg in SEGMENTS:
            assert batch[f"tags_{seg}"] == [[f"{seg}_{i}", "x"] for i in ids.tolist()]
            assert batch[f"tokens_{seg}"] == [[[i, 1], [2]] for i in ids.tolist()]
            assert batch[f"tokens_sep_{seg}"] == [[[i, 1, 267], [2, 267]] for i in ids.tolist()]
        assert len(batch["quality_label"]) == 4
    assert reader.stats.batches == reader.steps_per_epoch() and reader.stats.samples == 4 * reader.stats.batches
    assert reader.stats.wait_s >= 0 and reader.stats.row_groups_read > 0


def test_mean_only_cache(tmp_path):
    store = ArtifactStore(str(tmp_path / "root"))
    manifest = make_cache(store, {(64, 64): 8}, store_std=False)
    batch = next(iter(ChunkReader(manifest, store, batch_size=4, seed=0, latent_dtype=torch.float16)))
    assert batch["latent_std"] is None and batch["latent_mean"].dtype == torch.float16


def test_truncated_chunk_is_detected_with_a_clear_error(cache):
    store, manifest = cache
    path = store.path(manifest, manifest.chunks[0].path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ContractError, match="truncated") as err:
        list(ChunkReader(manifest, store, batch_size=4, seed=0))
    assert manifest.chunks[0].path in str(err.value) and "--force" in str(err.value)


def test_corrupt_chunk_of_same_size_fails_its_checksum(cache):
    store, manifest = cache
    path = store.path(manifest, manifest.chunks[1].path)
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ContractError, match="sha256"):
        list(ChunkReader(manifest, store, batch_size=4, seed=0))
