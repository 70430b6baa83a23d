"""Streaming-reader throughput from local disk (CPU only; target >= 5,000 samples/s on a 2-core box).

Writes a synthetic cache with the stage's own chunk writer — SD1.5 latent shape at 512²-area buckets
(4 x h/8 x w/8 fp16 mean + std, ~64 kB a row), Danbooru-sized captions (~30 tags, 1-4 ids each),
256 MB chunks with 8 MB row groups — then times full epochs of ChunkReader as the trainer would use
it (batch 12, shuffle buffer 1024, prefetch 2), reporting samples/s and the consumer's data-wait share.

    python bench/bench_reader.py [--n 20000] [--dir /tmp/bench-reader] [--epochs 2]

The first epoch also verifies every chunk's sha256 (as a fresh training process does); later epochs
are the steady state. Files written just before are in the page cache; pass --drop-cache to ask the
kernel to drop it first (needs root and affects the whole machine).
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_contracts.cache import CacheManifest  # noqa: E402
from data_contracts.store import ArtifactStore  # noqa: E402
from tasks.cache.chunks import chunk_table, plan_chunks, write_chunk  # noqa: E402
from tasks.cache.reader import ChunkReader  # noqa: E402

BUCKETS = [(512, 512), (448, 576), (576, 448), (384, 640), (640, 384)]
SEG_TAGS = {"count": 1, "character": 1, "series": 1, "general": 26, "artist": 1, "quality": 3}


def build(root: Path, n: int, seed: int = 0) -> tuple[ArtifactStore, CacheManifest]:
    store = ArtifactStore(str(root))
    fp = f"bench{n}"
    if store.is_complete("cache", fp):
        return store, store.read_manifest(CacheManifest, fp)
    rng = np.random.default_rng(seed)
    work = store.begin("cache", fp, resume=False)
    ids = np.arange(n, dtype=np.int64)
    which = rng.choice(len(BUCKETS), size=n, p=[0.4, 0.15, 0.15, 0.15, 0.15])
    order = np.lexsort((ids, which))
    ids, which = ids[order], which[order]
    bw = np.array([BUCKETS[k][0] for k in which])
    bh = np.array([BUCKETS[k][1] for k in which])
    plans = plan_chunks(ids, bw, bh, channels=4, downscale=8, store_std=True, chunk_bytes=256e6, row_group_bytes=8e6)
    vocab = [f"tag_{i}" for i in range(3000)]
    chunks = []
    for plan in plans:
        sub = ids[plan.start : plan.stop]
        k = len(sub)
        w, h = plan.bucket
        meta = {"id": sub, "bucket_w": [w] * k, "bucket_h": [h] * k, "flip": [False] * k,
                "quality_label": ["good score"] * k, "tag_weight": np.ones(k, np.float32)}
        for seg, count in SEG_TAGS.items():
            tags = [[vocab[j] for j in rng.integers(0, len(vocab), count)] for _ in range(k)]
            toks = [[rng.integers(300, 40000, rng.integers(1, 5)).tolist() for _ in row] for row in tags]
            meta[f"tags_{seg}"] = tags
            meta[f"tokens_{seg}"] = toks
            meta[f"tokens_sep_{seg}"] = [[t + [267] for t in row] for row in toks]
        shape = (k, 4, h // 8, w // 8)
        mean = rng.standard_normal(shape, dtype=np.float32).astype(np.float16)
        std = np.abs(rng.standard_normal(shape, dtype=np.float32) * 0.05).astype(np.float16)
        chunks.append(write_chunk(work, plan, chunk_table(pa.table(meta), mean, std)))
    manifest = CacheManifest(stage="cache", contract_version=CacheManifest.CONTRACT_VERSION, fingerprint=fp,
                             config_digest="bench", code_version="bench", vae_identity="0" * 64,
                             tokenizer_identity="0" * 64, scaling_factor=0.18215, chunks=chunks,
                             row_counts={"chunks": n})
    return store, store.commit(manifest, work)


def run_epoch(reader: ChunkReader, epoch: int, step_s: float) -> tuple[float, float, int]:
    reader.set_epoch(epoch)
    wait0 = reader.stats.wait_s
    t0 = time.perf_counter()
    samples = 0
    for batch in reader:
        samples += len(batch["id"])
        if step_s:
            time.sleep(step_s)  # stands in for a training step that releases the GIL (GPU work)
    dt = time.perf_counter() - t0
    return samples / dt, (reader.stats.wait_s - wait0) / dt, samples


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--dir", default="/tmp/bench-reader")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--keep", action="store_true", help="keep the synthetic cache for the next run")
    ap.add_argument("--drop-cache", action="store_true")
    args = ap.parse_args()
    root = Path(args.dir)
    t0 = time.perf_counter()
    store, manifest = build(root, args.n)
    size = sum(c.bytes for c in manifest.chunks)
    print(f"cache: {args.n} samples, {len(manifest.chunks)} chunks, {size / 1e9:.2f} GB "
          f"({size / args.n / 1e3:.1f} kB/sample), built in {time.perf_counter() - t0:.1f}s")
    if args.drop_cache:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch threads {torch.get_num_threads()}, load avg {os.getloadavg()[0]:.1f}")
    for dtype in (torch.float32, torch.float16):
        reader = ChunkReader(manifest, store, batch_size=args.batch, seed=0, shuffle_buffer=1024, prefetch=2,
                             latent_dtype=dtype)
        for epoch in range(args.epochs):
            rate, wait, samples = run_epoch(reader, epoch, 0.0)
            note = " (verifies sha256)" if epoch == 0 and dtype == torch.float32 else ""
            print(f"latents {str(dtype).replace('torch.', ''):8s} epoch {epoch}: {rate:8.0f} samples/s "
                  f"({samples} samples){note}")
    # A consumer that spends 12 ms per batch of 12 off the GIL, as a GPU step does (1,000 samples/s: ~10x
    # the recipe's per-GPU training rate): how much of its time does it wait for data?
    reader = ChunkReader(manifest, store, batch_size=args.batch, seed=0, latent_dtype=torch.float32)
    for epoch in (5, 6):
        rate, wait, _ = run_epoch(reader, epoch, 0.012)
        note = " (first epoch: verifies sha256 of each chunk on first touch)" if epoch == 5 else ""
        print(f"with a 12 ms/batch consumer, epoch {epoch}: {rate:.0f} samples/s, data wait {100 * wait:.2f}% "
              f"of wall time{note}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
