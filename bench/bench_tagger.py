#!/usr/bin/env python
"""WD SwinV2 tagger throughput: our GPU path vs the reference path, same images, same run.

  ours       threads read files -> batched nvJPEG decode (torchvision.io.decode_jpeg on the device) ->
             pad-to-square white + antialiased bicubic resize on the device -> bf16 timm SwinV2 with fused
             window attention (optionally torch.compile) on an overlapped decode stream -> merge.
  reference  PIL decode + pad + resize in DataLoader worker processes -> eager timm fp32 -> merge.

Both start from JPEG files on disk and end with merged tag rows (tasks/tag/merge.py), so the figure is
"files -> written tags". The model is the real architecture (swinv2_base_window8_256, img_size 448,
window 14, 10,861 classes, random weights with the label-prior head bias); --tiny swaps in the tiny
stand-in for a CPU smoke test. Also reported: model-only throughput per variant, decode-only throughput,
MFU (131 GFLOP/img for the real model, from REFERENCE.md; measured FLOPs printed too) and ONNX Runtime
CPU throughput (--onnx tiny|real).

  GPU:   python bench/bench_tagger.py --n 4096
  smoke: python bench/bench_tagger.py --tiny --n 32 --device cpu
  ONNX CPU only, real model: python bench/bench_tagger.py --only-onnx --onnx real --onnx-n 16
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.tag.backends import OnnxBackend, TorchBackend  # noqa: E402
from tasks.tag.cpu_pipeline import run_cpu_pipeline  # noqa: E402
from tasks.tag.gpu_pipeline import decode_batch, load_file, prepare_batch, run_pipeline  # noqa: E402
from tasks.tag.merge import Merger, MergeRules  # noqa: E402
from tasks.tag.model import open_folder  # noqa: E402
from tasks.tag.preprocess import load_and_preprocess, to_timm_input  # noqa: E402
from tasks.tag.timm_model import create_timm_model, load_timm_weights  # noqa: E402
from tasks.tag.tiny import LABELS_FILE, TINY_MODEL_ARGS, write_tagger_folder  # noqa: E402

REAL_MODEL_ARGS = {"act_layer": "gelu_tanh", "img_size": 448, "window_size": 14}
REAL_GFLOP_PER_IMAGE = 131.0  # REFERENCE.md: SwinV2-B tagger at 448
# Dense bf16 tensor-core peaks (TFLOP/s) by device-name fragment, most specific first.
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4),
                    ("GH200", 989.4), ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
                    ("RTX 4090", 165.2), ("A10", 125.0)]


# --- data --------------------------------------------------------------------------------------
def _one_jpeg(args: tuple[int, int, int]) -> bytes:
    """A smooth, photo-like JPEG (random low-res colour field upscaled + shapes), ~100-200 KB at 768x1024."""
    from PIL import Image, ImageDraw

    seed, w, h = args
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (12, 9, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(40):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(10, w // 3)), y0 + int(rng.integers(10, h // 3))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill, outline=(0, 0, 0))
    noise = rng.normal(0, 6, (h, w, 3))
    arr = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_images(folder: Path, n: int, width: int, height: int, unique: int, procs: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    unique = max(1, min(n, unique))
    with ProcessPoolExecutor(max_workers=procs) as pool:
        blobs = list(pool.map(_one_jpeg, [(i, width, height) for i in range(unique)], chunksize=4))
    paths = []
    for i in range(n):  # distinct files (real reads), repeated content beyond `unique` to save generation time
        path = folder / f"{i:06d}.jpg"
        path.write_bytes(blobs[i % unique])
        paths.append(path)
    return paths


# --- model -------------------------------------------------------------------------------------
def build_model_folder(folder: Path, tiny: bool, with_onnx: bool) -> Path:
    args = TINY_MODEL_ARGS if tiny else REAL_MODEL_ARGS
    return write_tagger_folder(folder, LABELS_FILE, seed=0, model_args=args, with_onnx=with_onnx)


def measured_gflop(model: torch.nn.Module, size: int, device: str, dtype: torch.dtype) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, size, size, device=device, dtype=dtype)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 1e9


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    for fragment, peak in PEAK_BF16_TFLOPS:
        if fragment in name:
            return peak
    return None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# --- paths -------------------------------------------------------------------------------------
class _PilDataset(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path], size: int) -> None:
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(load_and_preprocess(self.paths[i], self.size))


def run_reference(paths, folder, device, batch, workers, merger, keep: int):
    """PIL in worker processes + eager timm fp32 (timm's own attention) + merge."""
    model = load_timm_weights(create_timm_model(folder.config), folder.weights_path).to(device).eval()
    size = folder.config_input_size
    loader = torch.utils.data.DataLoader(_PilDataset(paths, size), batch_size=batch, num_workers=workers,
                                         pin_memory=device == "cuda", persistent_workers=False,
                                         prefetch_factor=4 if workers else None)
    with torch.inference_mode():  # warm-up (cuBLAS/cuDNN init) on one batch, outside the clock
        x = torch.from_numpy(np.stack([load_and_preprocess(p, size) for p in paths[:batch]])).to(device)
        model(to_timm_input(x.permute(0, 3, 1, 2)))
    _sync(device)
    rows, kept = 0, []
    start = time.perf_counter()
    with torch.inference_mode():
        for x in loader:
            x = x.to(device, non_blocking=True).permute(0, 3, 1, 2)
            probs = torch.sigmoid(model(to_timm_input(x))).float().cpu().numpy()
            for p in probs:
                merger.merge(p, ["solo"], [])
                rows += 1
            if len(kept) < keep:
                kept.extend(probs[: keep - len(kept)])
    _sync(device)
    seconds = time.perf_counter() - start
    del model
    return {"images": rows, "seconds": seconds, "images_per_s": rows / seconds}, np.array(kept)


def run_ours(paths, backend: TorchBackend, device, batch, workers, merger, keep: int, warm_batches: int = 2):
    items = list(enumerate(paths))
    predict = lambda x: backend.predict_tensor(x, normalised=True)  # noqa: E731
    t0 = time.perf_counter()  # warm-up: compile (if any), allocator, nvJPEG handles
    for _ in run_pipeline(items[: batch * warm_batches], predict, backend.input_size, device, batch, workers,
                          transform=backend.normalise):
        pass
    _sync(device)
    warm = time.perf_counter() - t0
    rows, kept = 0, []
    start = time.perf_counter()
    for result in run_pipeline(items, predict, backend.input_size, device, batch, workers,
                               transform=backend.normalise):
        for p in result.probs:
            merger.merge(p, ["solo"], [])
            rows += 1
        if len(kept) < keep:
            kept.extend(result.probs[: keep - len(kept)])
    _sync(device)
    seconds = time.perf_counter() - start
    return {"images": rows, "seconds": seconds, "images_per_s": rows / seconds, "warmup_s": warm}, np.array(kept)


def model_only(forward, size, device, dtype, batch, iters) -> float:
    x = torch.randn(batch, 3, size, size, device=device).to(dtype)
    with torch.inference_mode():
        for _ in range(2):
            forward(x)
        _sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            forward(x)
        _sync(device)
    return batch * iters / (time.perf_counter() - start)


def decode_only(paths, size, device, batch, iters) -> float:
    loaded = [load_file(p) for p in paths[:batch]]
    prepare_batch(decode_batch(loaded, device), size, device)
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        prepare_batch(decode_batch(loaded, device), size, device)
    _sync(device)
    return batch * iters / (time.perf_counter() - start)


def run_onnx_cpu(folder, paths, n, batch, threads):
    backend = OnnxBackend(folder, "cpu", threads=threads)
    items = list(enumerate(paths[:n]))
    list(run_cpu_pipeline(items[:1], backend.predict, backend.input_size, 1, 2))  # warm-up
    start = time.perf_counter()
    rows = sum(len(r.keys) for r in run_cpu_pipeline(items, backend.predict, backend.input_size, batch, 2))
    seconds = time.perf_counter() - start
    return {"images": rows, "seconds": seconds, "images_per_s": rows / seconds, "threads": threads or os.cpu_count()}


# --- main --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096, help="images per path")
    ap.add_argument("--tiny", action="store_true", help="tiny stand-in model (CPU smoke test)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--ref-batch-size", type=int, default=0, help="reference batch (default: --batch-size)")
    ap.add_argument("--workers", type=int, default=8, help="reader threads of our path")
    ap.add_argument("--ref-workers", type=int, default=0, help="reference PIL worker processes (default: all cores)")
    ap.add_argument("--size", default="768x1024", help="generated JPEG width x height")
    ap.add_argument("--unique", type=int, default=512, help="distinct generated images (files repeat content)")
    ap.add_argument("--variants", default=None,
                    help="our model variants, comma separated: eager, compile, eager-unfused, compile-unfused "
                         "(default: eager,compile on GPU, eager on CPU)")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--model-only-iters", type=int, default=10)
    ap.add_argument("--onnx", default="auto", choices=["auto", "none", "tiny", "real"],
                    help="ONNX Runtime CPU throughput with the tiny or real model (auto: tiny with --tiny)")
    ap.add_argument("--onnx-n", type=int, default=32)
    ap.add_argument("--onnx-threads", type=int, default=0)
    ap.add_argument("--only-onnx", action="store_true", help="just the ONNX Runtime CPU measurement")
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak for MFU (default: by device name)")
    ap.add_argument("--workdir", default=None, help="where to write images/models (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dev_name = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    procs = args.ref_workers or os.cpu_count() or 2
    width, height = (int(v) for v in args.size.lower().split("x"))
    onnx_kind = ("tiny" if args.tiny else "none") if args.onnx == "auto" else args.onnx
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_tagger_"))
    results: dict = {"device": dev_name, "torch": torch.__version__, "n": args.n, "image_size": [width, height],
                     "model": "tiny" if args.tiny else "swinv2_base_window8_256@448 (random weights)"}
    print(f"device: {dev_name}  torch {torch.__version__}  model: {results['model']}  workdir: {work}", flush=True)
    try:
        t0 = time.perf_counter()
        n_img = max(args.n, args.onnx_n) if not args.only_onnx else args.onnx_n
        paths = make_images(work / "images", n_img, width, height, args.unique, procs)
        total_mb = sum(p.stat().st_size for p in paths) / 2**20
        print(f"generated {len(paths)} JPEGs {width}x{height} ({total_mb:.0f} MiB) in {time.perf_counter() - t0:.1f}s",
              flush=True)
        paths_main = paths[: args.n]

        if not args.only_onnx:
            t0 = time.perf_counter()
            folder = open_folder(build_model_folder(work / "model", args.tiny, with_onnx=False))
            print(f"built model folder in {time.perf_counter() - t0:.1f}s", flush=True)
            size = folder.config_input_size
            merger = Merger(folder.labels, MergeRules())
            keep = 64
            ref_bs = args.ref_batch_size or args.batch_size
            if not args.skip_reference:
                ref, ref_probs = run_reference(paths_main, folder, device, ref_bs, procs, merger, keep)
                results["reference"] = ref
                print(f"reference (PIL x{procs} procs + eager timm fp32, bs {ref_bs}): "
                      f"{ref['images_per_s']:.1f} img/s", flush=True)
            dtype = torch.bfloat16 if device == "cuda" else torch.float32
            gflop_measured = None
            variants = args.variants or ("eager,compile" if device == "cuda" else "eager")
            for variant in [v.strip() for v in variants.split(",") if v.strip()]:
                backend = TorchBackend(folder, device, compile=variant.startswith("compile"),
                                       fused_attention=not variant.endswith("unfused"))
                if gflop_measured is None:
                    gflop_measured = measured_gflop(backend.model, size, device, dtype)
                res, our_probs = run_ours(paths_main, backend, device, args.batch_size, args.workers, merger, keep)
                res["model_only_images_per_s"] = model_only(backend._forward, size, device, dtype, args.batch_size,
                                                            args.model_only_iters)
                if not args.skip_reference:
                    res["speedup_vs_reference"] = res["images_per_s"] / results["reference"]["images_per_s"]
                    m = min(len(ref_probs), len(our_probs))
                    res["max_abs_prob_diff_vs_reference"] = float(np.abs(ref_probs[:m] - our_probs[:m]).max())
                results[f"ours_{variant}"] = res
                print(f"ours ({variant}, {str(dtype).replace('torch.', '')}, bs {args.batch_size}): {res['images_per_s']:.1f} img/s "
                      f"end to end, model alone {res['model_only_images_per_s']:.1f} img/s, warm-up "
                      f"{res['warmup_s']:.1f}s" + (f", {res['speedup_vs_reference']:.2f}x reference, max |dp| "
                                                   f"{res['max_abs_prob_diff_vs_reference']:.2e}"
                                                   if "speedup_vs_reference" in res else ""), flush=True)
                del backend
                if device == "cuda":
                    torch.cuda.empty_cache()
            # Model-only baselines of timm itself (no fused attention), same batch.
            timm_model = load_timm_weights(create_timm_model(folder.config), folder.weights_path).to(device).eval()
            results["model_only_timm_fp32"] = model_only(timm_model, size, device, torch.float32, args.batch_size,
                                                         args.model_only_iters)
            if device == "cuda":
                results["model_only_timm_bf16"] = model_only(timm_model.to(torch.bfloat16), size, device,
                                                             torch.bfloat16, args.batch_size, args.model_only_iters)
            del timm_model
            results["decode_resize_only_images_per_s"] = decode_only(paths_main, size, device, args.batch_size, 5)
            print("model alone: timm fp32 {:.1f} img/s{}; decode+resize alone {:.1f} img/s".format(
                results["model_only_timm_fp32"],
                f", timm bf16 {results['model_only_timm_bf16']:.1f} img/s" if "model_only_timm_bf16" in results else "",
                results["decode_resize_only_images_per_s"]), flush=True)
            gflop = gflop_measured if args.tiny else REAL_GFLOP_PER_IMAGE
            results["gflop_per_image"] = gflop
            results["gflop_per_image_measured"] = gflop_measured
            peak = peak_tflops(dev_name, args.peak_tflops) if device == "cuda" else args.peak_tflops
            results["peak_bf16_tflops"] = peak
            for key in [k for k in results if k.startswith("ours_") or k == "reference"]:
                ips = results[key]["images_per_s"]
                results[key]["tflops"] = ips * gflop / 1e3
                if peak:
                    results[key]["mfu"] = ips * gflop / 1e3 / peak
            print(f"FLOPs/img: {gflop:.3g} GFLOP (counted: {gflop_measured:.3g}); bf16 peak: {peak or 'unknown'} TFLOP/s")

        if onnx_kind != "none":
            t0 = time.perf_counter()
            ofolder = build_model_folder(work / f"onnx_{onnx_kind}", onnx_kind == "tiny", with_onnx=True)
            export_s = time.perf_counter() - t0
            res = run_onnx_cpu(open_folder(ofolder), paths, args.onnx_n, 8, args.onnx_threads)
            res.update(model=onnx_kind, build_and_export_s=export_s)
            results["onnx_cpu"] = res
            print(f"ONNX Runtime CPU ({onnx_kind} model, {res['threads']} threads, PIL preprocessing): "
                  f"{res['images_per_s']:.2f} img/s over {res['images']} images (export {export_s:.1f}s)", flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    print("\n=== summary ===")
    if "reference" in results:
        print(f"reference: {results['reference']['images_per_s']:.1f} img/s")
    for key in [k for k in results if k.startswith("ours_")]:
        r = results[key]
        line = f"{key}: {r['images_per_s']:.1f} img/s"
        if "speedup_vs_reference" in r:
            line += f" = {r['speedup_vs_reference']:.2f}x reference"
        if "mfu" in r:
            line += f", MFU {100 * r['mfu']:.1f}% ({r['tflops']:.0f} TFLOP/s)"
        print(line)
    if "onnx_cpu" in results:
        r = results["onnx_cpu"]
        print(f"onnx_cpu ({r['model']} model, {r['threads']} threads): {r['images_per_s']:.2f} img/s")
    print(json.dumps(results, default=float))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))
    return results


if __name__ == "__main__":
    main()
