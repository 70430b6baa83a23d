"""Streaming reader over the cache chunks: bucket-homogeneous, shuffled, sharded, resumable batches.

Every epoch is planned from metadata alone (row-group sizes in the manifest), identically on every
rank, from (seed, epoch):
1. the row groups are shuffled and streamed, their rows shuffled, into one buffer per bucket;
2. once `shuffle_buffer` rows are buffered, a *global* batch of batch_size x world_size rows is drawn
   at random from a bucket that has enough (bucket chosen with probability proportional to its fill);
   the stream drains the same way at the end;
3. rank r takes slice r of each global batch. All ranks therefore see the same number of batches, of
   the same bucket at the same step (no DDP hang, no straggler shapes), and no sample twice.
   A bucket's last partial global batch is dropped (drop_last) or split evenly over the ranks,
   padded by repeating its own rows so the ranks stay in step.
A rank reads only the row groups that hold its rows, decodes only its rows, and frees them once
batched. The plan is a pure function of (manifest, seed, epoch, batch_size, world_size), so
`state_dict()` is just (epoch, batches consumed) and a resumed run yields exactly the remaining batches.
A background thread assembles batches ahead (`prefetch`); `stats.wait_s` is the time the consumer
waited for data.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from data_contracts.cache import SEGMENTS, CacheManifest
from data_contracts.errors import ConfigError, ContractError
from data_contracts.store import ArtifactStore

_ROW_BITS = 32  # a row reference packs (unit index, row within the unit) into one int64
_TEXT_KINDS = ("tags", "tokens", "tokens_sep")
_META_COLUMNS = ["id", "tag_weight", "quality_label"] + [f"{k}_{s}" for s in SEGMENTS for k in _TEXT_KINDS]


@dataclass(frozen=True)
class _Unit:
    chunk: int  # index into manifest.chunks
    group: int  # row group within the chunk
    bucket: tuple[int, int]
    rows: int


@dataclass
class ReaderStats:
    wait_s: float = 0.0  # consumer time blocked on the prefetch queue ("data wait")
    batches: int = 0
    samples: int = 0
    load_s: float = 0.0  # background time reading + decoding row groups
    assemble_s: float = 0.0  # background time building batches
    row_groups_read: int = 0


@dataclass
class _Loaded:
    """The rows this rank needs from one row group, decoded."""

    pos: dict[int, int]  # row within unit -> index into the arrays below
    ids: np.ndarray
    weights: np.ndarray
    mean: np.ndarray  # [k, C, h, w] fp16
    std: np.ndarray | None
    labels: list
    text: dict[str, list] = field(default_factory=dict)  # "tags_<seg>" / "tokens_<seg>" / "tokens_sep_<seg>"
    remaining: int = 0


def _list_column(col: pa.ChunkedArray | pa.Array) -> tuple[list[int], pa.Array]:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return arr.offsets.to_numpy().tolist(), arr.values


def _string_lists(col, rows: list[int]) -> list[list[str]]:
    off, values = _list_column(col)
    flat = values.to_pylist()
    return [flat[off[r] : off[r + 1]] for r in rows]


def _token_lists(col, rows: list[int]) -> list[list[list[int]]]:
    # Plain Python lists via flat buffers and offsets: ~10x faster than to_pylist() on nested lists.
    off, inner = _list_column(col)
    ioff = inner.offsets.to_numpy().tolist()
    flat = inner.values.to_numpy(zero_copy_only=False).tolist()
    lo, hi = off[rows[0]], off[rows[-1] + 1]  # rows are sorted: convert only the span they cover
    per_tag = [flat[a:b] for a, b in zip(ioff[lo:hi], ioff[lo + 1 : hi + 1])]
    return [per_tag[off[r] - lo : off[r + 1] - lo] for r in rows]


def latent_view(col, shape: tuple[int, ...], where: str) -> np.ndarray:
    """Binary column of fixed-size fp16 values -> [n, *shape] array viewing the Arrow buffer."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    width = int(np.prod(shape)) * 2
    if arr.null_count:
        raise ContractError(f"{where}: {arr.null_count} null latent(s) in a chunk that should have them all")
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32, count=n + 1, offset=arr.offset * 4)
    if n and (offsets[-1] - offsets[0] != n * width or np.any(np.diff(offsets) != width)):
        raise ContractError(f"{where}: latent byte size is not {width} (shape {shape}, fp16) for every row")
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8, count=n * width, offset=int(offsets[0]))
    return data.view(np.float16).reshape(n, *shape)


class ChunkReader:
    """Iterable of bucket-homogeneous batch dicts over a cache output (see the module docstring)."""

    def __init__(self, manifest: CacheManifest, store: ArtifactStore, *, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, shuffle_buffer: int = 1024, prefetch: int = 2, drop_last: bool = True,
                 latent_dtype: torch.dtype = torch.float32, verify: bool = True) -> None:
        if batch_size < 1:
            raise ConfigError(f"reader batch_size must be >= 1, found {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"reader rank {rank} is not in [0, world_size={world_size})")
        self.manifest = manifest
        self.store = store
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = max(0, shuffle_buffer)
        self.prefetch = max(1, prefetch)
        self.drop_last = drop_last
        self.latent_dtype = latent_dtype
        self.verify = verify
        self.stats = ReaderStats()
        self.epoch = 0
        self._resume_at = 0  # batches of self.epoch already consumed (from load_state_dict)
        self._consumed = 0
        self._units: list[_Unit] = []
        for ci, chunk in enumerate(manifest.chunks):
            w, h = (int(v) for v in chunk.bucket.split("x"))
            groups = chunk.row_groups or [chunk.rows]
            if sum(groups) != chunk.rows:
                raise ContractError(f"cache manifest: chunk {chunk.path} row groups {groups} do not sum to "
                                    f"{chunk.rows}")
            self._units.extend(_Unit(ci, gi, (w, h), n) for gi, n in enumerate(groups))
        self._files: dict[int, pq.ParquetFile] = {}
        self._verified: set[int] = set()

    # ---------------------------------------------------------------------------------- planning
    def _global_batches(self, epoch: int) -> list[np.ndarray]:
        """Every global batch of the epoch (row refs, batch_size * world_size each, or padded remainders)."""
        rng = np.random.default_rng([self.seed, epoch, 0x5EED])
        g = self.batch_size * self.world_size
        buffers: dict[tuple[int, int], list[int]] = {}
        total = 0
        out: list[np.ndarray] = []

        def draw() -> bool:
            nonlocal total
            eligible = [b for b, buf in buffers.items() if len(buf) >= g]
            if not eligible:
                return False
            sizes = np.array([len(buffers[b]) for b in eligible], dtype=np.float64)
            bucket = eligible[int(rng.choice(len(eligible), p=sizes / sizes.sum()))]
            buf = buffers[bucket]
            picks = np.sort(rng.choice(len(buf), size=g, replace=False))[::-1]
            batch = []
            for p in picks:  # swap-remove, largest position first so pending picks stay valid
                batch.append(buf[p])
                buf[p] = buf[-1]
                buf.pop()
            out.append(np.array(batch[::-1], dtype=np.int64))
            total -= g
            return True

        for u in rng.permutation(len(self._units)):
            unit = self._units[u]
            refs = (int(u) << _ROW_BITS) + rng.permutation(unit.rows)
            buffers.setdefault(unit.bucket, []).extend(refs.tolist())
            total += unit.rows
            while total >= self.shuffle_buffer and draw():
                pass
        while draw():
            pass
        if not self.drop_last:
            for bucket in sorted(buffers):
                rest = buffers[bucket]
                if rest:
                    per_rank = -(-len(rest) // self.world_size)
                    padded = np.resize(np.array(rest, dtype=np.int64), per_rank * self.world_size)
                    out.append(padded)
        return out

    def steps_per_epoch(self) -> int:
        g = self.batch_size * self.world_size
        counts: dict[tuple[int, int], int] = {}
        for unit in self._units:
            counts[unit.bucket] = counts.get(unit.bucket, 0) + unit.rows
        full = sum(n // g for n in counts.values())
        return full + (0 if self.drop_last else sum(1 for n in counts.values() if n % g))

    def _rank_slice(self, batch: np.ndarray) -> np.ndarray:
        per_rank = len(batch) // self.world_size
        return batch[self.rank * per_rank : (self.rank + 1) * per_rank]

    # --------------------------------------------------------------------------------- resuming
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration plays; a resume offset survives only for its own epoch."""
        if epoch != self.epoch:
            self._resume_at = 0
        self.epoch = epoch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches": self._consumed, "seed": self.seed, "batch_size": self.batch_size,
                "world_size": self.world_size, "drop_last": self.drop_last, "shuffle_buffer": self.shuffle_buffer,
                "cache_fingerprint": self.manifest.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "batch_size", "world_size", "drop_last", "shuffle_buffer", "cache_fingerprint"):
            mine = self.state_dict()[key]
            if key in state and state[key] != mine:
                raise ConfigError(
                    f"reader state was saved with {key}={state[key]!r} but this reader has {mine!r}; the batch "
                    "order would differ — resume with the same setting (or start a new run)")
        self.epoch = int(state["epoch"])
        self._resume_at = self._consumed = int(state["batches"])

    # ---------------------------------------------------------------------------------- reading
    def _file(self, ci: int) -> pq.ParquetFile:
        f = self._files.get(ci)
        if f is None:
            rel = self.manifest.chunks[ci].path
            path = self.store.path(self.manifest, rel, verify=self.verify and ci not in self._verified)
            self._verified.add(ci)
            try:
                f = pq.ParquetFile(path, memory_map=True)
            except (OSError, pa.ArrowInvalid) as exc:
                raise ContractError(f"{path}: not a readable Parquet chunk ({exc}); "
                                    "rerun `fm run cache --force`") from exc
            if len(self._files) >= 16:  # bounded open files
                self._files.pop(next(iter(self._files)))
            self._files[ci] = f
        return f

    def _load(self, u: int, rows: np.ndarray) -> _Loaded:
        unit = self._units[u]
        chunk = self.manifest.chunks[unit.chunk]
        where = f"cache/{self.manifest.fingerprint}/{chunk.path} row group {unit.group}"
        cols = ["latent_mean"] + (["latent_std"] if self.manifest.stores_std else []) + _META_COLUMNS
        try:
            table = self._file(unit.chunk).read_row_group(unit.group, columns=cols)
        except (OSError, pa.ArrowInvalid) as exc:
            raise ContractError(f"{where}: cannot be read ({exc}); rerun `fm run cache --force`") from exc
        if table.num_rows != unit.rows:
            raise ContractError(f"{where}: {table.num_rows} rows, manifest says {unit.rows}")
        w, h = unit.bucket
        f = self.manifest.latent_downscale
        shape = (self.manifest.latent_channels, h // f, w // f)
        take = np.asarray(rows, dtype=np.int64)
        labels = table.column("quality_label").to_pylist()
        mean = latent_view(table.column("latent_mean"), shape, where)[take].copy()
        std = latent_view(table.column("latent_std"), shape, where)[take].copy() if self.manifest.stores_std else None
        loaded = _Loaded(
            pos={int(r): i for i, r in enumerate(take)},
            ids=table.column("id").to_numpy()[take],
            weights=table.column("tag_weight").to_numpy(zero_copy_only=False)[take].astype(np.float32),
            mean=mean, std=std,
            labels=[labels[int(r)] for r in take],
        )
        rows_list = take.tolist()
        for seg in SEGMENTS:
            loaded.text[f"tags_{seg}"] = _string_lists(table.column(f"tags_{seg}"), rows_list)
            for kind in ("tokens", "tokens_sep"):
                loaded.text[f"{kind}_{seg}"] = _token_lists(table.column(f"{kind}_{seg}"), rows_list)
        return loaded

    def _batches(self, epoch: int, start: int, stop: threading.Event) -> Iterator[dict[str, Any]]:
        mine = [self._rank_slice(b) for b in self._global_batches(epoch)[start:]]
        # Rows (and how many times: padding may repeat one) this rank needs from every unit.
        need: dict[int, dict[int, int]] = {}
        for batch in mine:
            for ref in batch.tolist():
                per = need.setdefault(ref >> _ROW_BITS, {})
                row = ref & ((1 << _ROW_BITS) - 1)
                per[row] = per.get(row, 0) + 1
        live: dict[int, _Loaded] = {}
        mask = (1 << _ROW_BITS) - 1
        for batch in mine:
            if stop.is_set():
                return
            t0 = time.perf_counter()
            refs = batch.tolist()
            for ref in refs:
                u = ref >> _ROW_BITS
                if u not in live:
                    rows = np.array(sorted(need[u]), dtype=np.int64)
                    live[u] = self._load(u, rows)
                    live[u].remaining = sum(need[u].values())
                    self.stats.row_groups_read += 1
            t1 = time.perf_counter()
            parts = [(live[ref >> _ROW_BITS], live[ref >> _ROW_BITS].pos[ref & mask]) for ref in refs]
            out = self._assemble(parts, self._units[refs[0] >> _ROW_BITS].bucket)
            for ref in refs:
                u = ref >> _ROW_BITS
                live[u].remaining -= 1
                if live[u].remaining == 0:
                    del live[u]
            self.stats.load_s += t1 - t0
            self.stats.assemble_s += time.perf_counter() - t1
            yield out

    def _stack(self, rows: list[np.ndarray]) -> torch.Tensor:
        # Cast row by row: one SD1.5 latent (16k values) stays under torch's parallel grain size, so the
        # fp16 -> fp32 copy runs on this thread. A whole-batch cast goes to the intra-op thread pool,
        # which stalls when the cores are shared (measured 2-4x slower per epoch on 2 busy cores).
        out = torch.empty((len(rows), *rows[0].shape), dtype=self.latent_dtype)
        for j, row in enumerate(rows):
            out[j].copy_(torch.from_numpy(row))
        return out

    def _assemble(self, parts: list[tuple[_Loaded, int]], bucket: tuple[int, int]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "id": torch.tensor([int(ld.ids[i]) for ld, i in parts], dtype=torch.int64),
            "bucket": bucket,
            "latent_mean": self._stack([ld.mean[i] for ld, i in parts]),
            "latent_std": self._stack([ld.std[i] for ld, i in parts]) if self.manifest.stores_std else None,
            "tag_weight": torch.tensor([float(ld.weights[i]) for ld, i in parts], dtype=torch.float32),
            "quality_label": [ld.labels[i] for ld, i in parts],
        }
        for key in parts[0][0].text:
            batch[key] = [ld.text[key][i] for ld, i in parts]
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch, start = self.epoch, self._resume_at
        self._resume_at = 0
        self._consumed = start
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def produce() -> None:
            try:
                for batch in self._batches(epoch, start, stop):
                    while not stop.is_set():
                        try:
                            q.put(batch, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(done)
            except BaseException as exc:  # surfaced in the consumer
                q.put(exc)

        thread = threading.Thread(target=produce, name=f"chunk-reader-{self.rank}", daemon=True)
        thread.start()
        try:
            while True:
                t0 = time.perf_counter()
                item = q.get()
                self.stats.wait_s += time.perf_counter() - t0
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                self._consumed += 1
                self.stats.batches += 1
                self.stats.samples += len(item["id"])
                yield item
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)


def open_reader(store: ArtifactStore, fingerprint: str | None = None, **kwargs: Any) -> ChunkReader:
    """A reader over the current (or the given) cache output."""
    return ChunkReader(store.read_manifest(CacheManifest, fingerprint), store, **kwargs)


def chunk_paths(manifest: CacheManifest, store: ArtifactStore) -> list[Path]:
    """Local paths of every chunk (for DuckDB/Polars/pyarrow.dataset users)."""
    return [store.path(manifest, c.path) for c in manifest.chunks]
