"""The caching loop of one device: decode -> encode -> write, overlapped.

Threads read (and on the CPU path decode + resize with PIL, which releases the GIL) ahead of the
encoder. On CUDA the threads only read JPEG bytes; nvJPEG decodes them in one batched call and the
resize/crop runs on the device, on a side stream, while the previous batch encodes on the main one.
Each batch's latents are copied into pinned memory right behind its encoder, and the host waits for
batch k only after batch k+1 is queued, so the GPU never idles on the host. Finished chunks are
assembled, written and journalled by a writer thread. Several GPUs: this process on the first, one supervised
process on each other (tasks/common/workers.py), chunks claimed one by one, largest first, each with its own
journal (`run_sharded`).
Measured on one H100 (bench/bench_cache.py): 256 img/s end to end at 512² buckets, 90 % of the
compiled encoder alone (285 img/s), 2.0x the kohya-style reference.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from data_contracts.errors import StageError
from data_contracts.store import atomic_write_text
from pipeline_config.cache import CacheConfig
from tasks.cache.chunks import (
    ChunkPlan,
    append_journal,
    chunk_table,
    is_done,
    journal_entry,
    read_journal,
    write_chunk,
)
from tasks.cache.encode import LatentEncoder
from tasks.cache.reuse import located, read_reused
from tasks.cache.images import (
    Geometry,
    ImageError,
    crop_tensor,
    decode_tensors,
    load_pil,
    prepare,
    uint8_to_pixels,
)
from tasks.common.claims import claim
from tasks.common.journal import read_records
from tasks.common.workers import (
    Supervisor,
    Worker,
    child_env,
    python_call,
    visible_gpu_ids,
)

log = logging.getLogger(__name__)
Backend = Literal["pil", "torch"]
ChunkDone = Callable[[ChunkPlan, dict], None]


@dataclass
class LoopStats:
    images: int = 0  # encoded here (not the latents read from an earlier output: tasks/cache/reuse.py)
    rejects: int = 0
    chunks: int = 0
    bytes: int = 0
    seconds: float = 0.0
    encode_wait_s: float = 0.0  # time the encoder waited for decoded images
    device_wait_s: float = 0.0  # time the host waited for the device (GPU-bound when ~ seconds)
    first_chunk_at: float | None = None  # time.time() when this loop's first chunk was on disk and journalled
    # run_sharded: each participant's timeline (where a spawned process's start-up goes), for logs and benches
    participants: list[dict] = field(default_factory=list)

    def merge(self, other: "LoopStats") -> None:
        for name in ("images", "rejects", "chunks", "bytes", "encode_wait_s", "device_wait_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.seconds = max(self.seconds, other.seconds)
        self.participants += other.participants


@dataclass
class _Pending:
    plan: ChunkPlan
    batches_left: int
    rows: list[np.ndarray] = field(default_factory=list)
    means: list[np.ndarray] = field(default_factory=list)
    stds: list[np.ndarray] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)


def geometry(cols: dict, i: int) -> Geometry:
    return Geometry(cols["width"][i], cols["height"][i], cols["resize_w"][i], cols["resize_h"][i],
                    (cols["crop_left"][i], cols["crop_top"][i], cols["crop_right"][i], cols["crop_bottom"][i]),
                    bool(cols["flip"][i]))


def _rejected(cols: dict, r: int, exc: ImageError) -> dict:
    """A rejects row naming the image by its pool-relative path when the samples carry it (`image_rel`, set by
    inputs.localize), so the rejects table is the same whichever machine or cache folder read the image."""
    detail = exc.detail
    if "image_rel" in cols:
        detail = detail.replace(cols["image"][r], cols["image_rel"][r])
    return {"id": int(cols["id"][r]), "reason": exc.reason, "detail": detail}


def _load_pil_batch(cols: dict, rows: np.ndarray, pin: bool = False) -> tuple[np.ndarray, object, list[dict]]:
    ok, arrays, rejects = [], [], []
    for r in rows:
        try:
            arrays.append(load_pil(cols["image"][r], geometry(cols, r)))
            ok.append(r)
        except ImageError as exc:
            rejects.append(_rejected(cols, r, exc))
    if not arrays:
        return np.asarray(ok, np.int64), None, rejects
    batch = torch.from_numpy(np.stack(arrays))  # uint8 [n, h, w, 3]: 4x less to upload than floats
    return np.asarray(ok, np.int64), (batch.pin_memory() if pin else batch), rejects


def _prepare_batch(cols: dict, rows: np.ndarray, cpu_jpeg: bool = False, pin: bool = False
                   ) -> tuple[np.ndarray, object, list[dict]]:
    ok, items, rejects = [], [], []
    for r in rows:
        try:
            item = prepare(cols["image"][r], cpu_jpeg)
            items.append(item.pin_memory() if pin and isinstance(item, torch.Tensor) else item)
            ok.append(r)
        except ImageError as exc:
            rejects.append(_rejected(cols, r, exc))
    return np.asarray(ok, np.int64), items, rejects


def _to_pixels(backend: Backend, cols: dict, ok: np.ndarray, payload, device: torch.device
               ) -> tuple[np.ndarray, torch.Tensor | None, list[dict]]:
    """Decoded batch -> (rows kept, pixels [n,3,h,w] in [-1,1] on device, extra rejects)."""
    if payload is None or len(ok) == 0:
        return ok, None, []
    if backend == "pil":
        return ok, uint8_to_pixels(payload.to(device, non_blocking=True)), []
    wheres = [cols["image"][r] for r in ok]
    decoded = decode_tensors(payload, device, wheres)
    keep, pixels, rejects = [], [], []
    for r, img in zip(ok, decoded):
        try:
            if isinstance(img, ImageError):
                raise img
            pixels.append(crop_tensor(img, geometry(cols, r), cols["image"][r]))
            keep.append(r)
        except ImageError as exc:
            rejects.append(_rejected(cols, r, exc))
    if not pixels:
        return np.asarray(keep, np.int64), None, rejects
    return np.asarray(keep, np.int64), torch.stack(pixels), rejects


class _Lanes:
    """CUDA: images are prepared (upload, nvJPEG, resize) on a side stream while the encoder runs on the
    main one, and each batch's latents are copied into pinned memory right behind its encoder, so the
    host waits only for that copy, never for the batch queued after it. CPU: plain calls."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.prep = torch.cuda.Stream(device) if self.cuda else None

    def preparing(self):
        return torch.cuda.stream(self.prep) if self.cuda else nullcontext()

    def hand_over(self, pixels: torch.Tensor) -> None:
        if self.cuda:
            main = torch.cuda.current_stream(pixels.device)
            main.wait_stream(self.prep)
            pixels.record_stream(main)  # allocated on the side stream, used on the main one

    def to_host(self, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], object]:
        if not self.cuda:
            return tensors, None
        hosts = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        for h, t in zip(hosts, tensors):
            h.copy_(t, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return hosts, done


def bucket_sizes(plans: list[ChunkPlan]) -> dict[tuple[int, int], int]:
    sizes: dict[tuple[int, int], int] = {}
    for plan in plans:
        sizes[plan.bucket] = sizes.get(plan.bucket, 0) + plan.stop - plan.start
    return sizes


def decode_backend(decode: str, device: torch.device) -> Backend:
    """cache.decode resolved for a device: auto is torch (nvJPEG + GPU resize) on CUDA, PIL on the CPU."""
    return decode if decode != "auto" else ("torch" if device.type == "cuda" else "pil")  # type: ignore[return-value]


@dataclass(frozen=True)
class EncodeSettings:
    """How one device's loop runs: the cache section's part of it, plus this host's reading threads."""

    backend: Backend
    batch_size: int
    compile: bool
    store_std: bool
    threads: int = 1  # reading (and on the CPU path decoding) threads
    compile_min_images: int = 0  # a bucket with fewer images (in the whole stage) runs eagerly
    cpu_jpeg: bool = False  # torch backend: decode JPEGs in the reading threads, not on the device

    @classmethod
    def from_section(cls, section: CacheConfig, device: torch.device, threads: int) -> EncodeSettings:
        return cls(decode_backend(section.decode, device), section.batch_size, section.compile, section.store_std,
                   max(1, threads), section.compile_min_images)


class ChunkEncoder:
    """One device's caching loop: encode and write planned chunks, each journalled once written.

    Several processes may share the plans: `encode(..., claim=...)` takes plan i only if claim(i) says it
    is this one's, asked when the reading threads reach it (a batch or so ahead), so the faster device
    takes more chunks. With `compile`, a bucket with fewer than `compile_min_images` images runs eagerly:
    compiling one more shape costs more than it saves on a few images. `bucket_rows` gives the bucket sizes
    of the whole stage when the plans are only a part of it (a shard), so the choice stays the same. The
    LatentEncoder (and its compiled graphs) is kept across calls."""

    def __init__(self, settings: EncodeSettings, encoder: LatentEncoder, work: Path, journal: Path) -> None:
        self.settings = settings
        self.encoder = encoder
        self.work = work
        self.journal = journal

    @classmethod
    def from_section(cls, section: CacheConfig, vae: torch.nn.Module | LatentEncoder, device: torch.device, *,
                     threads: int, work: Path, journal: Path) -> ChunkEncoder:
        """The loop the cache section describes on `device` (`vae` may be a LatentEncoder to reuse)."""
        encoder = vae if isinstance(vae, LatentEncoder) else LatentEncoder(vae, device, section.batch_size,
                                                                           compile=section.compile)
        return cls(EncodeSettings.from_section(section, encoder.device, threads), encoder, work, journal)

    def encode(self, samples: pa.Table, plans: list[ChunkPlan], *, claim: Callable[[int], bool] | None = None,
               on_chunk: ChunkDone | None = None,
               bucket_rows: dict[tuple[int, int], int] | None = None) -> LoopStats:
        """Encode and write every planned chunk this process takes (in order)."""
        if not plans:
            return LoopStats()
        return _Pass(self, samples, plans, claim, on_chunk, bucket_rows).run()


class _Pass:
    """One `ChunkEncoder.encode` call: the chunks in flight between the reading threads, the encoder and the
    writer thread."""

    def __init__(self, owner: ChunkEncoder, samples: pa.Table, plans: list[ChunkPlan],
                 claim: Callable[[int], bool] | None, on_chunk: ChunkDone | None,
                 bucket_rows: dict[tuple[int, int], int] | None) -> None:
        self.started = time.monotonic()
        self.settings, self.encoder = owner.settings, owner.encoder
        self.work, self.journal = owner.work, owner.journal
        self.samples, self.plans, self.claim, self.on_chunk = samples, plans, claim, on_chunk
        self.stats = LoopStats()
        self.cols = samples.select([n for n in samples.column_names
                                    if not n.startswith(("tags_", "tokens_"))]).to_pydict()
        self.pending: dict[int, _Pending] = {}
        self.writes: deque[Future] = deque()
        self.per_bucket = bucket_rows or bucket_sizes(plans)  # over every plan: compile choices ignore claims
        self.lanes = _Lanes(self.encoder.device)

    def jobs(self):
        """(plan index, "encode" | "reuse", sample rows): batches to decode and encode, and for each chunk one job
        that reads the latents an earlier output holds for its other samples (tasks/cache/reuse.py)."""
        batch_size = self.settings.batch_size
        for p_idx, plan in enumerate(self.plans):
            if self.claim is not None and not self.claim(p_idx):
                continue
            encode, reuse = located(self.cols, np.arange(plan.start, plan.stop))
            batches = [encode[i : i + batch_size] for i in range(0, len(encode), batch_size)]
            self.pending[p_idx] = _Pending(plan, len(batches) + (1 if len(reuse) else 0))
            if len(reuse):
                yield p_idx, "reuse", reuse
            yield from ((p_idx, "encode", b) for b in batches)

    def run(self) -> LoopStats:
        s, lanes, stats, device = self.settings, self.lanes, self.stats, self.encoder.device
        load = (partial(_load_pil_batch, pin=lanes.cuda) if s.backend == "pil"
                else partial(_prepare_batch, cpu_jpeg=s.cpu_jpeg, pin=lanes.cuda))
        reuse = partial(read_reused, store_std=s.store_std)
        lookahead = max(2, s.threads * 2)
        jobs = self.jobs()
        with ThreadPoolExecutor(s.threads, thread_name_prefix="cache-decode") as pool, \
                ThreadPoolExecutor(1, thread_name_prefix="cache-write") as self.writer:
            futures: deque[tuple[int, str, Future]] = deque()
            jobs_left = True
            in_flight = None  # (p_idx, rows, host latents, copy-done event) of the batch still on its way back
            while jobs_left or futures:
                while jobs_left and len(futures) < lookahead:
                    job = next(jobs, None)
                    if job is None:
                        jobs_left = False
                        break
                    p_idx, kind, rows = job
                    futures.append((p_idx, kind, pool.submit(reuse if kind == "reuse" else load, self.cols, rows)))
                if not futures:
                    break
                p_idx, kind, fut = futures.popleft()
                t0 = time.monotonic()
                if kind == "reuse":  # read from an earlier output: nothing for the device
                    rows, arrays = fut.result()
                    stats.encode_wait_s += time.monotonic() - t0
                    self.keep(p_idx, rows, arrays)
                    self.batch_done(p_idx)
                    continue
                ok, payload, rejects = fut.result()
                stats.encode_wait_s += time.monotonic() - t0
                with lanes.preparing():
                    ok, pixels, more = _to_pixels(s.backend, self.cols, ok, payload, device)
                rejects += more
                self.pending[p_idx].rejects.extend(rejects)
                stats.rejects += len(rejects)
                latents = done = None
                if pixels is not None:
                    lanes.hand_over(pixels)
                    compiled = self.per_bucket[self.pending[p_idx].plan.bucket] >= s.compile_min_images
                    mean, std = self.encoder(pixels, compiled=compiled)
                    latents, done = lanes.to_host([mean, std] if s.store_std else [mean])
                    stats.images += len(ok)
                if in_flight is not None:
                    self.finish(*in_flight)
                in_flight = (p_idx, ok, latents, done)
            if in_flight is not None:
                self.finish(*in_flight)
            while self.writes:
                self.collect(self.writes.popleft())
        stats.seconds = time.monotonic() - self.started
        return stats

    def finish(self, p_idx: int, rows: np.ndarray, latents: list[torch.Tensor] | None, done) -> None:
        """A batch is back from the device: keep its finite latents; a chunk with every batch back is written."""
        st, stats = self.pending[p_idx], self.stats
        if latents is not None:
            if done is not None:
                t0 = time.monotonic()
                done.synchronize()
                stats.device_wait_s += time.monotonic() - t0
            arrays = [t.numpy().copy() for t in latents]  # copy: the pinned buffers go back to the pool
            finite = np.all(np.isfinite(arrays[0].reshape(len(rows), -1)), axis=1)
            for a in arrays[1:]:
                finite &= np.all(np.isfinite(a.reshape(len(rows), -1)), axis=1)
            for r in rows[~finite]:  # an image that drives the encoder to inf/NaN is data, not a crash
                st.rejects.append({"id": int(self.cols["id"][r]), "reason": "nonfinite_latent",
                                   "detail": "the VAE encoder returned inf/NaN for this image"})
                stats.rejects += 1
            self.keep(p_idx, rows[finite], [a[finite] for a in arrays])
        self.batch_done(p_idx)

    def keep(self, p_idx: int, rows: np.ndarray, arrays: list[np.ndarray]) -> None:
        """Latents of some of a chunk's rows ([mean] or [mean, std], encoded here or read from an earlier output)."""
        st = self.pending[p_idx]
        st.rows.append(rows)

        def flat(a: np.ndarray) -> np.ndarray:  # encoded and read latents concatenate alike (also 0 rows)
            return a.reshape(len(rows), int(np.prod(a.shape[1:])))

        st.means.append(flat(arrays[0]))
        if self.settings.store_std:
            st.stds.append(flat(arrays[1]))

    def batch_done(self, p_idx: int) -> None:
        """One of a chunk's jobs is in; a chunk with all of them in is written."""
        st = self.pending[p_idx]
        st.batches_left -= 1
        if st.batches_left == 0:
            self.writes.append(self.writer.submit(self.write, self.pending.pop(p_idx)))
            while len(self.writes) > 2:  # bound memory: at most a few chunks waiting for the disk
                self.collect(self.writes.popleft())

    def write(self, st: _Pending) -> tuple[ChunkPlan, dict]:
        # On the writer thread: assembling a 256 MB chunk must not stall the encoder's feeding loop.
        rows = np.concatenate(st.rows) if st.rows else np.zeros(0, np.int64)
        order = np.argsort(rows, kind="stable")  # keep the plan's id order whatever the batch order
        meta = self.samples.take(pa.array(rows[order]))
        mean = np.concatenate(st.means)[order] if st.means else np.zeros((0,), np.float16)
        std = ((np.concatenate(st.stds)[order] if st.stds else np.zeros((0,), np.float16))
               if self.settings.store_std else None)
        info = write_chunk(self.work, st.plan, chunk_table(meta, mean, std))
        entry = journal_entry(st.plan, info, st.rejects)
        append_journal(self.journal, entry)
        if self.stats.first_chunk_at is None:  # here, not in collect: chunks are collected up to two writes late
            self.stats.first_chunk_at = time.time()
        return st.plan, entry

    def collect(self, fut: Future) -> None:
        plan, entry = fut.result()
        self.stats.chunks += 1
        self.stats.bytes += entry["bytes"]
        if self.on_chunk is not None:
            self.on_chunk(plan, entry)


# --------------------------------------------------------------------------------- several GPUs

@dataclass
class WorkerJob:
    samples_path: str
    plans: list[ChunkPlan]  # every plan, largest first; participants claim them one by one
    claims: str  # folder of claim files (tasks.common.claims.claim)
    model: str
    cache_dir: str
    work: str
    settings: EncodeSettings  # each participant's loop (threads: its share of the host's)
    device: str = "cuda"  # "cuda": each participant on its own GPU; "cpu": every participant on the CPU
    bucket_rows: dict | None = None  # rows per bucket over the whole stage (compile choices)
    started_at: float = 0.0  # time.time() when run_sharded spawned the participants

    def save(self, path: Path) -> None:
        """As JSON for the spawned participants (bucket keys are tuples: stored as [w, h, rows])."""
        data = {**self.__dict__, "plans": [dataclasses.asdict(p) for p in self.plans],
                "settings": dataclasses.asdict(self.settings),
                "bucket_rows": [[*b, n] for b, n in self.bucket_rows.items()] if self.bucket_rows else None}
        path.write_text(json.dumps(data))

    @classmethod
    def load(cls, path: Path) -> WorkerJob:
        data = json.loads(path.read_text())
        data["plans"] = [ChunkPlan(**{**p, "bucket": tuple(p["bucket"])}) for p in data["plans"]]
        data["settings"] = EncodeSettings(**data["settings"])
        if data["bucket_rows"] is not None:
            data["bucket_rows"] = {(w, h): n for w, h, n in data["bucket_rows"]}
        return cls(**data)


def load_vae(model: str, cache_dir: Path):
    from tasks.models.load import load_sd15
    from tasks.models.sources import resolve_model_source

    source = resolve_model_source(model, cache_dir)
    return load_sd15(source, components=("vae",), dtype=torch.float32, device="cpu", cache_dir=cache_dir).vae


def _participant_device(job: WorkerJob) -> torch.device:
    if job.device == "cuda":  # this process's first GPU; a spawned participant sees only its own
        torch.cuda.set_device(0)
        return torch.device("cuda", 0)
    return torch.device("cpu")  # CPU participants: only for tests of the sharing itself


def _run_participant(rank: int, job: WorkerJob, samples: pa.Table, vae: torch.nn.Module,
                     on_chunk: ChunkDone | None = None) -> LoopStats:
    claims, s = Path(job.claims), job.settings
    encoder = LatentEncoder(vae, _participant_device(job), s.batch_size, compile=s.compile)
    loop = ChunkEncoder(s, encoder, Path(job.work), Path(job.work) / f"_journal-{rank}.jsonl")
    return loop.encode(samples, job.plans, claim=lambda i: claim(claims, i), on_chunk=on_chunk,
                       bucket_rows=job.bucket_rows or bucket_sizes(job.plans))


def _timeline(rank: int, job: WorkerJob, up: float | None, loaded: float | None, stats: LoopStats) -> dict:
    """Seconds from the spawn: process up (interpreter + imports), VAE loaded, first chunk written, done."""
    at = job.started_at

    def since(t: float | None) -> float | None:
        return round(t - at, 2) if t is not None else None

    return {"rank": rank, "up_s": since(up), "vae_loaded_s": since(loaded),
            "first_chunk_s": since(stats.first_chunk_at), "done_s": since(time.time()),
            "chunks": stats.chunks, "images": stats.images,
            "loop_images_per_s": round(stats.images / stats.seconds, 1) if stats.seconds else 0.0}


def participant_main(job_file: str, rank_text: str, result_dir: str) -> None:
    """A spawned participant (rank >= 1; the calling process is rank 0), run through tasks.common.worker_entry."""
    up = time.time()
    rank = int(rank_text)
    job = WorkerJob.load(Path(job_file))
    if job.device == "cpu":
        torch.set_num_threads(1)
    progress = Path(result_dir, f"progress-{rank}.json")  # what a participant stopped mid-start-up got to
    atomic_write_text(progress, json.dumps({"up": up}))
    samples = pq.read_table(job.samples_path)
    vae = load_vae(job.model, Path(job.cache_dir))
    loaded = time.time()
    atomic_write_text(progress, json.dumps({"up": up, "loaded": loaded}))
    stats = _run_participant(rank, job, samples, vae)
    stats.participants = [_timeline(rank, job, up, loaded, stats)]
    # atomic: a stop mid-write must not leave half a JSON under the name read back
    atomic_write_text(Path(result_dir, f"stats-{rank}.json"), json.dumps(stats.__dict__))


def _journal_stats(journal: Path) -> LoopStats:
    """What a participant stopped before reporting wrote, from its journal (a resumed run's journal
    also holds the chunks of the run before: a report figure, never used to decide what is done)."""
    stats = LoopStats()
    for entry in read_records(journal):
        stats.chunks += 1
        stats.images += int(entry["rows"])
        stats.bytes += int(entry["bytes"])
        stats.rejects += len(entry["rejects"])
    return stats


def _participant_devices(device: str, gpus: int) -> list[str]:
    """What each participant may see: "cpu", or the GPU id (as CUDA_VISIBLE_DEVICES names it) of rank r."""
    if device == "cpu":
        return ["cpu"] * gpus
    ids = visible_gpu_ids()
    if len(ids) < gpus:
        raise StageError(f"cache: {gpus} GPU participants asked for, but only {len(ids)} GPU(s) are visible; "
                         "lower cache.gpus (0 = every visible GPU)")
    return ids[:gpus]


def run_sharded(samples: pa.Table, plans: list[ChunkPlan], *, gpus: int, work: Path, model: str, cache_dir: Path,
                backend: Backend, batch_size: int, compile: bool, store_std: bool, threads: int,
                device: str = "cuda", compile_min_images: int = 0, vae: torch.nn.Module | None = None,
                on_chunk: ChunkDone | None = None,
                bucket_rows: dict[tuple[int, int], int] | None = None) -> LoopStats:
    """Every device takes part: this process on the first (it has its VAE already, so it starts at once),
    one spawned process on each other, seeing only its own GPU. Plans are ordered largest first and each
    participant claims the next free one as its reading reaches it, so a device that starts late (a spawned
    process imports torch and loads its VAE first) or runs slower simply takes fewer chunks. Each participant
    journals to its own file, so a kill of any of them resumes like the single-process loop."""
    import shutil

    devices = _participant_devices(device, gpus)
    samples_path = work / "_samples.parquet"
    pq.write_table(samples, samples_path)
    claims = work / "_claims"
    shutil.rmtree(claims, ignore_errors=True)  # a killed run's claims: the journals say what is done
    claims.mkdir()
    result_dir = work / "_stats"
    shutil.rmtree(result_dir, ignore_errors=True)  # a killed run's figures are not this run's
    result_dir.mkdir()
    order = sorted(plans, key=lambda p: -(p.stop - p.start))
    settings = EncodeSettings(backend, batch_size, compile, store_std, max(1, threads // gpus), compile_min_images)
    job = WorkerJob(str(samples_path), order, str(claims), model, str(cache_dir), str(work), settings, device,
                    bucket_rows, started_at=time.time())
    job_file = result_dir / "job.json"
    job.save(job_file)

    def all_written(worker: Worker) -> bool:
        # Every chunk written: a participant still starting up has nothing left to claim, so it is stopped
        # rather than waited for (it holds no claim; its stats come from its journal).
        done = read_journal(work)
        return all(is_done(p, done) for p in order)

    supervisor = Supervisor(on_line=lambda w, line: log.info("[cache %s] %s", w.label, line))
    with supervisor:  # this process failing or cancelled: no orphans
        for rank in range(1, gpus):
            label = f"participant {rank} on {'cpu' if devices[rank] == 'cpu' else 'gpu' + devices[rank]}"
            supervisor.start(f"cache {label}", python_call("tasks.cache.pipeline:participant_main", str(job_file),
                                                           str(rank), str(result_dir)),
                             env=child_env(devices[rank]), label=label)
        relay = supervisor.relay_in_background("cache-relay")
        up = time.time()
        vae = vae if vae is not None else load_vae(model, cache_dir)
        loaded = time.time()
        total = _run_participant(0, job, samples, vae, on_chunk)
        total.participants = [_timeline(0, job, up, loaded, total)]
        supervisor.wait(relay, all_written)
    supervisor.check()
    for rank in range(1, gpus):
        stats_file = result_dir / f"stats-{rank}.json"
        if stats_file.exists():
            total.merge(LoopStats(**json.loads(stats_file.read_text())))
            continue
        stopped = _journal_stats(work / f"_journal-{rank}.jsonl")
        try:
            got = json.loads((result_dir / f"progress-{rank}.json").read_text())
        except (OSError, ValueError):
            got = {}
        stopped.participants = [{**_timeline(rank, job, got.get("up"), got.get("loaded"), stopped),
                                 "done_s": None, "stopped": True}]
        total.merge(stopped)
    shutil.rmtree(result_dir, ignore_errors=True)
    shutil.rmtree(claims, ignore_errors=True)
    samples_path.unlink(missing_ok=True)
    for p in total.participants:
        log.info("cache participant %d: up %ss, VAE loaded %ss, first chunk %ss, done %ss after the spawn; "
                 "%d chunks, %d images, %s img/s in its loop%s", p["rank"], p["up_s"], p["vae_loaded_s"],
                 p["first_chunk_s"], p["done_s"], p["chunks"], p["images"], p["loop_images_per_s"],
                 " (stopped: every chunk was written)" if p.get("stopped") else "")
    return total
