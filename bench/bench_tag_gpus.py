#!/usr/bin/env python
"""The tag stage on every visible GPU: one worker process per GPU vs one process on one GPU, same run.

Runs the real stage (tasks.tag.stage through run_stage: journaled shards, merge, weights, report) over
--n generated 768x1024 JPEGs committed as an ingest output, with the real WD SwinV2 shape (random
weights, bf16, fused window attention). First `tag.processes=1` (this process, GPU 0 — what a one-GPU
host runs), then `tag.processes=0` (every visible GPU: this process on the first, one worker process on each
other, shards claimed dynamically — tasks/common/shard_workers.py), forced,
same fingerprint; asserts both write the same tags.parquet and prints wall times, img/s and the scaling
efficiency (img/s on N GPUs / (N x img/s on one)). Stage wall time includes each worker's start-up
(import, model load) — the figure a user sees.

    python bench/bench_tag_gpus.py --n 16384
    python bench/bench_tag_gpus.py --tiny --n 256 --device cpu --processes 2   # CPU smoke test
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_tagger import build_model_folder, make_images  # noqa: E402
from data_contracts.ingest import POSTS_SCHEMA, IngestManifest  # noqa: E402
from data_contracts.store import ArtifactStore  # noqa: E402
from data_contracts.tables import write_table  # noqa: E402
from pipeline_config.load import load_config  # noqa: E402
from tasks.common.stage import run_stage  # noqa: E402
from tasks.tag import stage as tag_stage  # noqa: E402


def commit_ingest(store: ArtifactStore, images: list[Path]) -> None:
    """The generated files as a finished ingest output (real Parquet, real manifest, files in the pool)."""
    pool = store.pool_dir()
    rows = []
    for i, path in enumerate(images, start=1):
        data = path.read_bytes()
        md5 = hashlib.md5(data + i.to_bytes(8, "little")).hexdigest()  # distinct ids, repeated content is fine
        rel = f"{md5[:2]}/{md5}.jpg"
        (pool / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), pool / rel)
        rows.append({"id": i, "md5": md5, "rating": "g", "width": 768, "height": 1024, "file_ext": "jpg",
                     "file_size": len(data), "tags_general": ["1girl", "solo"], "tags_character": [],
                     "tags_copyright": [], "tags_artist": [], "tags_meta": [], "image_path": rel, "query": "bench"})
    fp = "bench" + hashlib.sha256(str(len(rows)).encode()).hexdigest()[:11]
    work = store.begin("ingest", fp, resume=False)
    table = pa.Table.from_pylist(rows, schema=POSTS_SCHEMA)
    write_table(table, work / "posts.parquet", POSTS_SCHEMA)
    manifest = IngestManifest(stage="ingest", contract_version=IngestManifest.CONTRACT_VERSION, fingerprint=fp,
                              upstream={}, config_digest="bench", code_version="bench",
                              row_counts={"posts": len(rows)}, source="danbooru_dump")
    store.commit(manifest, work)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--processes", type=int, default=0, help="the multi-process run (0 = one per GPU)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--shard-size", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=8, help="reader threads per process")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)8.0f ms %(message)s")  # stage + worker lines

    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-tag-gpus-"))
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    name = torch.cuda.get_device_name(0) if gpus else "CPU"
    print(f"device: {gpus} x {name}" if gpus else "device: CPU", flush=True)
    model = build_model_folder(root / "model", tiny=args.tiny, with_onnx=args.device == "cpu")
    t0 = time.perf_counter()
    images = make_images(root / "gen", args.n, 768, 1024, unique=512, procs=max(1, min(16, (torch.get_num_threads()))))
    print(f"generated {len(images)} JPEGs in {time.perf_counter() - t0:.0f} s", flush=True)

    base = [f"data_root={root / 'data'}", f"runtime.cache_dir={root / 'cache'}", f"tag.model={model}",
            f"tag.device={args.device}", f"tag.batch_size={args.batch_size}", f"tag.shard_size={args.shard_size}",
            f"tag.workers={args.workers}", f"tag.compile={str(args.compile).lower()}"]
    if args.device == "cuda":
        base.append("tag.backend=torch")
    cfg1 = load_config("demo", base + ["tag.processes=1"])
    store = ArtifactStore.for_config(cfg1)
    commit_ingest(store, images)

    results = {}
    for label, procs in (("1 process", 1), ("N processes", args.processes)):
        cfg = load_config("demo", base + [f"tag.processes={procs}"])
        t = time.perf_counter()
        out = run_stage(tag_stage.SPEC, cfg, store, force=True)
        seconds = time.perf_counter() - t
        n = out.manifest.row_counts["tags"]
        workers = {s.get("worker") for s in out.manifest.stats.get("shards", [])} if isinstance(
            out.manifest.stats.get("shards"), list) else set()
        data = store.path(out.manifest, "tags.parquet").read_bytes()
        results[label] = {"seconds": seconds, "images": n, "img_s": n / seconds, "bytes": data}
        print(f"{label:>12}: {n} images tagged in {seconds:.1f} s = {n / seconds:.0f} img/s"
              + (f" ({len(workers)} workers)" if workers else ""), flush=True)
    one, many = results["1 process"], results["N processes"]
    assert one["bytes"] == many["bytes"], "tags.parquet differs between 1 and N processes"
    n_dev = gpus if args.processes == 0 else args.processes
    n_dev = max(1, min(n_dev, gpus) if gpus else args.processes)
    print(f"same tags.parquet: yes; speed-up {many['img_s'] / one['img_s']:.2f}x on {n_dev} device(s), "
          f"scaling efficiency {many['img_s'] / (n_dev * one['img_s']) * 100:.1f}%")
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
