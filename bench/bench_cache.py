"""Cache-stage throughput: our path against the kohya-style reference, same images, same run.

End to end, from JPEG files to finished output, at kohya's 512²-area buckets (17 buckets, nearest
aspect ratio, resize to cover, centre crop), with the real SD1.5 VAE shape (random weights):

  ours       tasks.cache.pipeline.ChunkEncoder: threads read the files, JPEG decoded on the GPU (nvJPEG,
             batched), bicubic antialiased resize + crop on the GPU, bf16 encoder compiled with static
             shapes per bucket (torch.compile, compiled once per bucket before timing, compile time
             reported), cuDNN autotuning, latents copied back one batch late, Parquet chunks written and
             journalled by a writer thread; mean + std stored as fp16.
  reference  what kohya's latent caching does: a torch DataLoader with CPU workers running PIL (decode,
             convert, bicubic resize, crop, ToTensor/Normalize), batches grouped by bucket, the eager
             bf16 VAE, latent_dist.sample() saved as fp32 into one .npz per image.

Prints images/s of each, the ratio, MFU of ours (1.12 TFLOP per 512² image, against the dense bf16
peak given by --peak-tflops, default 989 for H100/H200 SXM), bytes written per sample, the device, and
the encoder alone (eager and compiled) so the gap between end to end and the model is visible.

    python bench/bench_cache.py                   # GPU: 1024 images, batch 32
    python bench/bench_cache.py --tiny --n 16     # CPU smoke test: tiny VAE, small images
    python bench/bench_cache.py --gpus 2 --skip-reference --n 8192   # + every GPU vs one (run_sharded)

--gpus N runs the several-device path (`tasks.cache.pipeline.run_sharded`, what `cache.gpus` selects) on
one device and on N, same plans, each as the stage runs it: participants load the VAE (spawned ones
from a single file holding the bench's random weights) and compile inside the timing, buckets
under the stage's compile_min_images (5,000) eager. Prints img/s of both and the scaling efficiency.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_contracts.cache import SEGMENTS  # noqa: E402
from tasks.cache.chunks import plan_chunks  # noqa: E402
from tasks.cache.encode import LatentEncoder, encode_dtype  # noqa: E402
from tasks.cache.pipeline import ChunkEncoder, EncodeSettings, run_sharded  # noqa: E402
from tasks.models.configs import SD15_CONFIG_DIR  # noqa: E402

FLOP_PER_IMAGE = 1.12e12  # SD VAE encoder at 512x512 (REFERENCE.md); buckets keep the pixel count ~512²
# Source sizes as Danbooru serves them (portrait-heavy), ~0.8-1.5 MP.
SOURCE_SIZES = [(768, 1024), (1024, 768), (900, 900), (850, 1200), (1200, 850), (720, 1280), (1280, 720),
                (1000, 1414), (640, 1136)]


# ------------------------------------------------------------------------------------ data prep

def kohya_buckets(area: int, step: int = 64, min_side: int = 256, max_side: int = 1024) -> list[tuple[int, int]]:
    side = int(math.sqrt(area)) // step * step
    out = {(side, side)}
    for w in range(min_side, max_side + 1, step):
        h = min(max_side, area // w // step * step)
        if h >= min_side:
            out.add((w, h))
            out.add((h, w))
    return sorted(out)


def assign(w: int, h: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    ratio = math.log(w / h)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - ratio))


def geometry(w: int, h: int, bw: int, bh: int) -> dict:
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    left, top = (rw - bw) // 2, (rh - bh) // 2
    return {"resize_w": rw, "resize_h": rh, "crop_left": left, "crop_top": top, "crop_right": left + bw,
            "crop_bottom": top + bh}


def _make_image(args: tuple[str, int, int, int]) -> int:
    from PIL import Image

    path, w, h, seed = args
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)  # smooth blobs
    img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
    noise = rng.integers(-12, 12, (h, w, 3))  # texture so the JPEG is ~photo-sized, not trivially small
    arr = np.clip(np.asarray(img).astype(np.int16) + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    Path(path).write_bytes(buf.getvalue())
    return len(buf.getvalue())


def make_images(folder: Path, n: int, sizes: list[tuple[int, int]], workers: int) -> list[tuple[str, int, int]]:
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(str(folder / f"{i:06d}.jpg"), *sizes[i % len(sizes)], i) for i in range(n)]
    todo = [j for j in jobs if not Path(j[0]).exists()]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_make_image, todo, chunksize=8))
    return [(p, w, h) for p, w, h, _ in jobs]


def samples_table(images: list[tuple[str, int, int]], buckets: list[tuple[int, int]]) -> pa.Table:
    rows = []
    for i, (path, w, h) in enumerate(images):
        bw, bh = assign(w, h, buckets)
        rows.append({"id": i, "image": path, "width": w, "height": h, "bucket_w": bw, "bucket_h": bh,
                     **geometry(w, h, bw, bh), "flip": False, "quality_label": "good score", "tag_weight": 1.0})
    rows.sort(key=lambda r: (r["bucket_w"], r["bucket_h"], r["id"]))
    table = pa.Table.from_pylist(rows)
    n = table.num_rows
    ids = pa.array([[[320, 1125]] * 20] * n, pa.list_(pa.list_(pa.int32())))
    tags = pa.array([["long hair"] * 20] * n, pa.list_(pa.string()))
    for seg in SEGMENTS:
        table = table.append_column(f"tags_{seg}", tags).append_column(f"tokens_{seg}", ids)
        table = table.append_column(f"tokens_sep_{seg}", ids)
    return table


def build_vae(tiny: bool):
    from diffusers import AutoencoderKL

    if tiny:
        from tasks.models.tiny import TINY_VAE_CONFIG
        config = dict(TINY_VAE_CONFIG)
    else:
        config = json.loads((SD15_CONFIG_DIR / "vae" / "config.json").read_text())
    torch.manual_seed(0)
    return AutoencoderKL.from_config(config).eval().requires_grad_(False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -------------------------------------------------------------------------------------- the paths

def make_encoder(samples: pa.Table, vae, device: torch.device, batch: int,
                 compile: bool) -> tuple[LatentEncoder, float]:
    """The encoder, compiled (and cuDNN-autotuned) for every bucket shape once, outside the timing."""
    encoder = LatentEncoder(vae, device, batch, compile=compile)
    shapes = sorted({(r["bucket_w"], r["bucket_h"]) for r in samples.select(["bucket_w", "bucket_h"]).to_pylist()})
    t0 = time.perf_counter()
    for bw, bh in shapes:
        encoder(torch.zeros(batch, 3, bh, bw, device=device))
    sync(device)
    return encoder, time.perf_counter() - t0


def fresh_plans(samples: pa.Table, out: Path) -> list:
    """An empty output folder and the stage's chunk plans (256 MB chunks, 8 MB row groups)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return plan_chunks(samples.column("id").to_numpy(), samples.column("bucket_w").to_numpy(),
                       samples.column("bucket_h").to_numpy(), channels=4, downscale=8, store_std=True,
                       chunk_bytes=256e6, row_group_bytes=8e6)


def run_ours(samples: pa.Table, encoder: LatentEncoder, device: torch.device, batch: int, out: Path,
             threads: int, backend: str, cpu_jpeg: bool) -> dict:
    plans = fresh_plans(samples, out)
    t0 = time.perf_counter()
    settings = EncodeSettings(backend, batch, encoder.compiled, store_std=True, threads=threads, cpu_jpeg=cpu_jpeg)
    stats = ChunkEncoder(settings, encoder, out, out / "_journal-0.jsonl").encode(samples, plans)
    sync(device)
    seconds = time.perf_counter() - t0
    written = sum(f.stat().st_size for f in out.rglob("*.parquet"))
    return {"seconds": seconds, "images": stats.images, "bytes": written, "encode_wait_s": stats.encode_wait_s,
            "device_wait_s": stats.device_wait_s}


def save_vae_file(vae, path: Path, tiny: bool) -> str:
    """A single-file checkpoint holding just the bench's VAE (first_stage_model.*, fp32), so spawned
    participants load the very same weights through the stage's own loader."""
    from tasks.models.single_file import export_single_file

    export_single_file(None, vae, None, path, dtype=torch.float32, embed_configs=tiny)
    return str(path)


def run_devices(samples: pa.Table, vae, device: torch.device, batch: int, out: Path, threads: int, backend: str,
                gpus: int, compile: bool, model: str) -> dict:
    """The stage's several-device path on `gpus` devices (1 = this process alone), end to end."""
    plans = fresh_plans(samples, out)
    t0 = time.perf_counter()
    stats = run_sharded(samples, plans, gpus=gpus, work=out, model=model, cache_dir=out.parent / "model-cache",
                        backend=backend, batch_size=batch, compile=compile, store_std=True,
                        threads=threads * gpus, device=device.type, compile_min_images=5000, vae=vae)
    seconds = time.perf_counter() - t0
    per_rank = {f.name: len(f.read_text().splitlines()) for f in sorted(out.glob("_journal-*.jsonl"))}
    return {"seconds": seconds, "images": stats.images, "chunks": per_rank, "participants": stats.participants}


class _RefDataset(torch.utils.data.Dataset):
    """kohya-style CPU preprocessing: PIL decode, RGB, bicubic resize to cover, crop, normalise."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        from PIL import Image

        r = self.rows[i]
        img = Image.open(r["image"]).convert("RGB")
        img = img.resize((r["resize_w"], r["resize_h"]), Image.Resampling.BICUBIC)
        img = img.crop((r["crop_left"], r["crop_top"], r["crop_right"], r["crop_bottom"]))
        arr = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        return arr, r["id"]


def run_reference(samples: pa.Table, vae, device: torch.device, batch: int, workers: int, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rows = samples.select(["id", "image", "resize_w", "resize_h", "crop_left", "crop_top", "crop_right",
                           "crop_bottom", "bucket_w", "bucket_h"]).to_pylist()
    batches, current = [], []
    for i, r in enumerate(rows):  # bucket-homogeneous batches (rows are sorted by bucket)
        if current and (rows[current[0]]["bucket_w"], rows[current[0]]["bucket_h"]) != (r["bucket_w"], r["bucket_h"]):
            batches.append(current)
            current = []
        current.append(i)
        if len(current) == batch:
            batches.append(current)
            current = []
    if current:
        batches.append(current)
    loader = torch.utils.data.DataLoader(_RefDataset(rows), batch_sampler=batches, num_workers=workers,
                                         pin_memory=device.type == "cuda", persistent_workers=False)
    dtype = encode_dtype(device)
    vae = vae.to(device=device, dtype=dtype)
    # warm-up outside the timing (first-call cuDNN/cuBLAS setup), as for ours
    with torch.no_grad():
        vae.encode(torch.zeros(1, 3, 512, 512, device=device, dtype=dtype))
    sync(device)
    t0 = time.perf_counter()
    n = 0
    with torch.no_grad():
        for pixels, ids in loader:
            latents = vae.encode(pixels.to(device, dtype=dtype)).latent_dist.sample()
            latents = latents.float().cpu().numpy()
            for lat, i in zip(latents, ids.tolist()):
                np.savez(out / f"{i:06d}.npz", latents=lat, original_size=np.array([0, 0]),
                         crop_ltrb=np.array([0, 0, 0, 0]))
            n += len(ids)
    seconds = time.perf_counter() - t0
    written = sum(f.stat().st_size for f in out.glob("*.npz"))
    return {"seconds": seconds, "images": n, "bytes": written}


def encoder_alone(enc: LatentEncoder, device: torch.device, shape: tuple[int, int], iters: int) -> float:
    batch = enc.batch_size
    x = torch.randn(batch, 3, shape[1], shape[0], device=device)
    for _ in range(2):
        enc(x)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        enc(x)
    sync(device)
    return batch * iters / (time.perf_counter() - t0)


def _parse(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tiny", action="store_true", help="tiny VAE and small images (CPU smoke test)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="reference DataLoader workers")
    ap.add_argument("--threads", type=int, default=8, help="our file-reading threads")
    ap.add_argument("--dir", default="/tmp/bench-cache")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--decode", choices=["auto", "pil", "torch"], default="auto")
    ap.add_argument("--alone-batch", type=int, action="append", default=[], help="also time the compiled encoder "
                    "alone at this batch size")
    ap.add_argument("--gpus", type=int, default=0, help="also run the several-device path on 1 and on N devices")
    ap.add_argument("--devices-only", action="store_true", help="with --gpus: only the warm-up and the 1-vs-N "
                    "device runs (a larger --n in the same time)")
    ap.add_argument("--try", dest="try_options", action="append", default=[], metavar="KEY=VALUE,...",
                    help="also time the encoder alone compiled with these inductor options, e.g. freezing=1")
    args = ap.parse_args()
    args.try_options = [(t, {k: _parse(v) for k, v in (kv.split("=", 1) for kv in t.split(","))})
                        for t in args.try_options]

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    area = 256 * 256 if args.tiny else 512 * 512
    sizes = [(w // 4, h // 4) for w, h in SOURCE_SIZES] if args.tiny else SOURCE_SIZES
    batch = min(args.batch, 8) if args.tiny else args.batch
    compile = not args.no_compile and device.type == "cuda"
    root = Path(args.dir)
    t0 = time.perf_counter()
    images = make_images(root / "images", args.n, sizes, max(1, min(args.workers, os.cpu_count() or 1)))
    jpeg_bytes = sum(Path(p).stat().st_size for p, _, _ in images)
    buckets = kohya_buckets(area, min_side=128, max_side=512) if args.tiny else kohya_buckets(area)
    samples = samples_table(images, buckets)
    used = sorted({(r["bucket_w"], r["bucket_h"]) for r in samples.select(["bucket_w", "bucket_h"]).to_pylist()})
    print(f"device: {name} | torch {torch.__version__} | {os.cpu_count()} CPUs")
    print(f"data: {args.n} JPEGs ({jpeg_bytes / args.n / 1e3:.0f} kB avg, made in {time.perf_counter() - t0:.1f}s), "
          f"{len(buckets)} buckets at {int(math.sqrt(area))}² area, {len(used)} used: {used}; batch {batch}")

    vae = build_vae(args.tiny)
    results = {}
    if args.devices_only:
        args.skip_reference = True
    if not args.skip_reference:
        ref = run_reference(samples, vae, device, batch, args.workers, root / "out-ref")
        results["reference"] = ref
        print(f"reference: {ref['images'] / ref['seconds']:7.1f} img/s  ({ref['images']} in {ref['seconds']:.1f}s, "
              f"{ref['bytes'] / ref['images'] / 1e3:.1f} kB/sample written, {args.workers} PIL workers, eager "
              f"{str(encode_dtype(device)).replace('torch.', '')})")
    # Also with --devices-only: the compile fills inductor's cache, so the 1- and N-device runs after it
    # start from the same place (neither pays a fresh compile the other does not).
    encoder, warm = make_encoder(samples, vae, device, batch, compile)
    print(f"ours: compile + cuDNN autotune warm-up {warm:.1f}s for {len(used)} bucket shapes (once per run)")
    backend = args.decode if args.decode != "auto" else ("torch" if device.type == "cuda" else "pil")
    if args.devices_only:
        variants = []
    elif backend == "torch":
        variants = [("torch", "jpeg on device", False), ("torch", "jpeg on CPU threads", True),
                    ("pil", "PIL decode+resize in threads", False)]
    else:
        variants = [(backend, backend, False)]
    for backend, label, cpu_jpeg in variants:
        ours = run_ours(samples, encoder, device, batch, root / "out-ours", args.threads, backend, cpu_jpeg)
        rate = ours["images"] / ours["seconds"]
        mfu = rate * FLOP_PER_IMAGE / (args.peak_tflops * 1e12) if device.type == "cuda" and not args.tiny else None
        print(f"ours ({backend}, {label}): {rate:7.1f} img/s  ({ours['images']} in {ours['seconds']:.1f}s, "
              f"{ours['bytes'] / ours['images'] / 1e3:.1f} kB/sample written (mean+std fp16 + captions), "
              f"host waited {ours['encode_wait_s']:.1f}s for images, {ours['device_wait_s']:.1f}s for the GPU)"
              + (f", MFU {100 * mfu:.1f}% of {args.peak_tflops:.0f} TFLOP/s" if mfu else ""))
        if "reference" in results:
            print(f"  ratio ours/reference: {rate / (ref['images'] / ref['seconds']):.2f}x")
    if device.type == "cuda" and not args.tiny and not args.devices_only:
        alone = [("eager", LatentEncoder(vae, device, batch, compile=False))]
        for b in args.alone_batch:
            alone.append((f"batch {b} compiled", LatentEncoder(vae, device, b, compile=True)))
        if compile:
            alone.append(("compiled", encoder))
            for label, opts in args.try_options:
                alone.append((f"compiled + {label}", LatentEncoder(vae, device, batch, compile=True,
                                                                   compile_options=opts)))
        for label, enc in alone:
            t0 = time.perf_counter()
            r = encoder_alone(enc, device, (512, 512), iters=10)
            print(f"encoder alone at 512x512, batch {enc.batch_size}, {label} bf16: {r:.1f} img/s "
                  f"(MFU {100 * r * FLOP_PER_IMAGE / (args.peak_tflops * 1e12):.1f}%; {time.perf_counter() - t0:.0f}s "
                  "incl. compile)")
    if args.gpus > 1:
        model = save_vae_file(vae, root / "vae-only.safetensors", args.tiny)
        backend = "torch" if device.type == "cuda" else "pil"
        runs = {}
        for n in (1, args.gpus):
            r = run_devices(samples, vae, device, batch, root / "out-devices", args.threads, backend, n,
                            compile, model)
            runs[n] = r["images"] / r["seconds"]
            print(f"run_sharded on {n} device(s): {runs[n]:7.1f} img/s ({r['images']} in {r['seconds']:.1f}s incl. "
                  f"start-up and compile; chunks by participant {r['chunks']})")
            for p in sorted(r["participants"], key=lambda p: p["rank"]):  # seconds after the spawn
                print(f"    participant {p['rank']}: up {p['up_s']}s, VAE loaded {p['vae_loaded_s']}s, first chunk "
                      f"{p['first_chunk_s']}s, done {p['done_s']}s; {p['chunks']} chunks, {p['images']} images, "
                      f"{p['loop_images_per_s']} img/s in its loop" + (" (stopped: nothing left)" if p.get("stopped") else ""))
        print(f"  {args.gpus} devices vs 1: {runs[args.gpus] / runs[1]:.2f}x, scaling efficiency "
              f"{100 * runs[args.gpus] / (args.gpus * runs[1]):.1f}%")
        shutil.rmtree(root / "out-devices", ignore_errors=True)
    shutil.rmtree(root / "out-ref", ignore_errors=True)
    shutil.rmtree(root / "out-ours", ignore_errors=True)


if __name__ == "__main__":
    main()
