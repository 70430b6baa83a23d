"""Training-step throughput: our step (tasks/train/engine.py) against the reference diffusers-style eager step.

Real SD1.5 UNet shape with random weights (bench/sd15_shapes.py), 512² (64x64 latents), batch 12, one
77-token CLIP chunk, fp32 weights + bf16 autocast, frozen CLIP-L text encoder run every step on both paths.

    python bench/bench_train.py                       # ref vs our variants, one GPU
    python bench/bench_train.py --variants ref,ours   # just the two headline paths
    python bench/bench_train.py --reader              # + data-wait share with the real streaming reader
    python bench/bench_train.py --ddp                 # + 2-GPU DDP scaling (needs 2 GPUs)
    python bench/bench_train.py --tiny --steps 3      # CPU smoke test of every path (tiny UNet)
    python bench/bench_train.py --variants "" --buckets --bucket-variants ref,ours_cg_reg,ours_cg:cold:2
        # the 17-bucket stream (bucket_mix): warm-up with an empty / a used compile cache, steady samples/s,
        # peak memory, MFU, each path in a process of its own; NAME:PHASES:SHAPES limits a path's shapes

Reference ("ref"): the loop of diffusers' train_text_to_image.py — eager UNet, torch.autocast(bf16), SDPA,
F.mse_loss, fused torch AdamW stepping every micro-batch.
Ours: tasks.train.engine.Engine under accelerate (what the training loop runs): torch.compile with static
shapes, channels_last, SDPA backend choice, optimiser once per `--accum` micro-batches (8-bit AdamW or fused
AdamW), no host sync inside an accumulation window.

Prints samples/s, ratio to ref, peak GiB (max allocated), MFU (2.47 TFLOP/sample fwd+bwd, against the
card's datasheet bf16 dense peak and against a measured 8192³ bf16 matmul), the device name.
`--profile ours` adds the kernel-time split (attention / conv / GEMM / Triton / other) of one variant.

Measured (H100 80GB HBM3, torch 2.11, 2026-11-26; three runs on three machines, same-run ratios):
    run  ref   compile(8bit,NCHW,flash)  compile+cuDNN-attn  cl+cuDNN 8bit  cl+cuDNN fused AdamW
    1    63.9  98.8 (1.54x, 19.1 GiB)    -                   (error*)       101.8 (1.59x, 24.3 GiB)
    2    68.5  -                         -                   89.9 (1.31x)   -        (compile_cl: 88.3)
    3    60.6  89.8 (1.48x, 19.1 GiB)    91.5 (1.51x, 19.1)  -              -
  * before engine.keep_channels_last: bitsandbytes made the weights contiguous under a channels_last graph.
  With the real reader (2-chunk prompts, 3,000 samples): 86.0 samples/s (run 3), data wait 0.02 %.
  Kernel split of cl+cuDNN 8bit (run 2, ms per 12-sample micro-step): Triton-fused norms/elementwise 43,
  conv 31.5, attention 19.5, GEMM 18.2, other (copies, grad accumulation adds) 12.3.
  channels_last only pays with fused AdamW here; with 8-bit AdamW it is even (87.7 vs 87.0), so NCHW stays.
  Session 2: ours_cg (CUDA graphs, the preset) 96.0 (1.59x) and 101.6 (1.50x) vs ours 85.8 / 95.1 in the
  same runs (ref 60.3 / 67.7); memory 17.5 GiB allocated incl. graph recording, 19.8 GiB reserved.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FLOP_PER_SAMPLE = 2.47e12  # SD1.5 UNet fwd+bwd at 64x64 latents, 77-token context (REFERENCE.md)
DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}
RESULT_PREFIX = "@@bench "


@dataclass(frozen=True)
class Variant:
    name: str
    path: str = "ours"  # ours | ref
    compile: bool = True
    channels_last: bool = False
    attention: str = "auto"
    optimizer: str = "adamw8bit"
    accum: int = 14
    batch: int = 12
    gradient_checkpointing: bool = False
    compile_mode: str = "default"  # default | reduce-overhead (CUDA graphs) | max-autotune-no-cudagraphs
    compile_tuning: bool = False  # inductor coordinate-descent tuning of its Triton kernels
    te_bf16: bool = False  # frozen text encoder stored in bf16 (no per-step weight casts)
    compile_strategy: str = "static"  # static: graph per bucket shape | dynamic: one graph | regional: per block
    cudnn_benchmark: bool = True  # cuDNN autotunes each new conv shape (costs time per new bucket shape)


VARIANTS = {
    "ref": Variant("ref", path="ref", compile=False, optimizer="adamw", accum=1),
    "ref_compile": Variant("ref_compile", path="ref", compile=True, optimizer="adamw", accum=1),
    "eager8bit": Variant("eager8bit", compile=False),
    "compile": Variant("compile"),
    "compile_cl": Variant("compile_cl", channels_last=True),
    # "ours" = the nai-v2-fm preset: compile, NCHW, cuDNN attention first, 8-bit AdamW once per 14 micro-batches
    "ours": Variant("ours", attention="cudnn"),
    "ours_fused": Variant("ours_fused", attention="cudnn", optimizer="adamw"),
    "ours_cl": Variant("ours_cl", channels_last=True, attention="cudnn"),
    "ours_cl_fused": Variant("ours_cl_fused", channels_last=True, attention="cudnn", optimizer="adamw"),
    "ours_gc": Variant("ours_gc", attention="cudnn", gradient_checkpointing=True),
    "ours_tune": Variant("ours_tune", attention="cudnn", compile_tuning=True),
    "ours_te16": Variant("ours_te16", attention="cudnn", te_bf16=True),
    "ours_cg": Variant("ours_cg", attention="cudnn", compile_mode="reduce-overhead"),
    "ours_cg_dyn": Variant("ours_cg_dyn", attention="cudnn", compile_mode="reduce-overhead",
                           compile_strategy="dynamic"),
    "ours_dyn": Variant("ours_dyn", attention="cudnn", compile_strategy="dynamic"),
    "ours_cg_reg": Variant("ours_cg_reg", attention="cudnn", compile_mode="reduce-overhead",
                           compile_strategy="regional"),
    "ours_cg_reg_nb": Variant("ours_cg_reg_nb", attention="cudnn", compile_mode="reduce-overhead",
                              compile_strategy="regional", cudnn_benchmark=False),
    "ours_cg_reg_b24": Variant("ours_cg_reg_b24", attention="cudnn", compile_mode="reduce-overhead",
                               compile_strategy="regional", batch=24),
    "ours_cg_reg_gc": Variant("ours_cg_reg_gc", attention="cudnn", compile_mode="reduce-overhead",
                              compile_strategy="regional", gradient_checkpointing=True),
    "ours_reg": Variant("ours_reg", attention="cudnn", compile_strategy="regional"),
    "ours_tune_te16": Variant("ours_tune_te16", attention="cudnn", compile_tuning=True, te_bf16=True),
}
DEFAULT_VARIANTS = "ref,ours,ours_fused,ours_cl_fused"


# ------------------------------------------------------------------------------------------------ models

def build_models(tiny: bool, device: torch.device):
    if tiny:
        from tasks.models.tiny import build_tiny_models

        unet, _, te = build_tiny_models(0)
        return unet.to(device), te.to(device)
    from bench.sd15_shapes import build_random_sd15_text_encoder, build_random_sd15_unet

    return build_random_sd15_unet(torch.float32, device), build_random_sd15_text_encoder(torch.float32, device)


def synthetic_batches(n: int, batch: int, latent: int | tuple[int, int], chunks: int, seed: int = 0):
    """`n` distinct micro-batches (rotated, so no cache effect from one buffer) on the CPU, pinned if CUDA.
    `latent`: side of square latents, or (height, width)."""
    lh, lw = (latent, latent) if isinstance(latent, int) else latent
    from tasks.diffusion.objectives import Objective
    from tasks.models.text_encode import pack_batch
    from tasks.train.batches import StepBatch

    g = torch.Generator().manual_seed(seed)
    obj = Objective("flow", shift=2.0)
    out = []
    for k in range(n):
        ids = [torch.randint(300, 40000, (75 * chunks - 5,), generator=g).tolist() for _ in range(batch)]
        sig = [obj.draw(g)[0] for _ in range(batch)]
        b = StepBatch(ids=list(range(k * batch, (k + 1) * batch)), bucket=(lw * 8, lh * 8),
                      x0=torch.randn(batch, 4, lh, lw, generator=g) * 0.8,
                      noise=torch.randn(batch, 4, lh, lw, generator=g),
                      levels=obj.levels(sig, [0] * batch), token_ids=pack_batch(ids, chunks),
                      weight=torch.ones(batch))
        out.append(b.pin() if torch.cuda.is_available() else b)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch._dynamo.reset()
    import torch._inductor.config as inductor_config

    inductor_config.coordinate_descent_tuning = False  # a variant's tuning must not leak into the next


# --------------------------------------------------------------------------------------------- the paths

def run_ref(v: Variant, args, device: torch.device) -> dict:
    """diffusers train_text_to_image.py-style step."""
    step = build_ref(v, args, device)
    batches = synthetic_batches(4, v.batch, args.latent, args.chunks)
    return _time(lambda i: step(batches[i % len(batches)]), v, args, device, window=1)


def build_ref(v: Variant, args, device: torch.device):
    """The reference step as a function of one micro-batch (optimiser step included: no accumulation)."""
    import torch.nn.functional as F

    from tasks.train.engine import encode_prompts

    unet, te = build_models(args.tiny, device)
    unet.train().requires_grad_(True)
    te.eval().requires_grad_(False)
    if v.compile:
        unet = torch.compile(unet)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=device.type == "cuda")
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=not args.tiny)

    def step(b) -> None:
        ids = b.token_ids.to(device, non_blocking=True)
        x0, noise = b.x0.to(device, non_blocking=True), b.noise.to(device, non_blocking=True)
        sigma = b.levels.sigma.to(device).view(-1, 1, 1, 1)
        with torch.no_grad(), torch.autocast(**amp):
            ctx = encode_prompts(te, te, ids, 2)
        x_t = (1 - sigma) * x0 + sigma * noise
        with torch.autocast(**amp):
            pred = unet(x_t, sigma.flatten() * 1000, encoder_hidden_states=ctx).sample
        loss = F.mse_loss(pred.float(), (noise - x0).float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def run_ours(v: Variant, args, device: torch.device, accelerator=None) -> dict:
    engine = build_ours(v, args, device, accelerator)
    batches = synthetic_batches(4, v.batch, args.latent, args.chunks)

    def micro(i: int) -> None:
        engine.micro_step(batches[i % len(batches)])
        if engine.window_full:
            engine.optimizer_step()

    out = _time(micro, v, args, device, window=v.accum, world=engine.acc.num_processes)
    if args.profile and v.name in args.profile.split(","):
        out["profile"] = profile_steps(lambda i: engine.micro_step(batches[i % len(batches)]), device)
        engine.optimizer.zero_grad(set_to_none=True)
        engine._micro = 0
        engine._loss_sum.zero_()
    return out


def build_ours(v: Variant, args, device: torch.device, accelerator=None):
    """Our Engine as the training loop builds it (prepare_unet, optimiser, accelerate)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from tasks.diffusion.objectives import Objective
    from tasks.train.engine import (
        Engine,
        configure_backends,
        ddp_whole_graph,
        make_optimizer,
        prepare_unet,
        warmup_constant,
    )

    if accelerator is None:
        AcceleratorState._reset_state(reset_partial_state=True)
        accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="no" if args.tiny else "bf16",
                                  step_scheduler_with_optimizer=False)
    configure_backends(device, v.attention, cudnn_benchmark=v.cudnn_benchmark)
    unet, te = build_models(args.tiny, device)
    prepare_unet(unet, gradient_checkpointing=v.gradient_checkpointing, channels_last=v.channels_last,
                 compile=v.compile, compile_mode=v.compile_mode, compile_tuning=v.compile_tuning,
                 ddp_whole_graph=ddp_whole_graph(accelerator.num_processes, v.accum),
                 compile_strategy=v.compile_strategy, compile_cache_dir=getattr(args, "compile_cache_dir", None),
                 compile_backend=getattr(args, "compile_backend", "inductor"))
    te.eval().requires_grad_(False)
    if v.te_bf16 and not args.tiny:
        te.to(torch.bfloat16)
    opt = make_optimizer([{"params": list(unet.parameters())}], kind=v.optimizer, lr=1e-5, device=device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_constant(1000, 0.0))
    unet, opt = accelerator.prepare(unet, opt)
    engine = Engine(accelerator, unet, opt, sched, Objective("flow", shift=2.0), grad_accum=v.accum,
                    max_grad_norm=1.0, text_encoder=te, clip_skip=2, channels_last=v.channels_last,
                    cudagraphs=v.compile and v.compile_mode == "reduce-overhead" and device.type == "cuda")
    return engine


def profile_steps(fn, device: torch.device, n: int = 2) -> dict:
    """Kernel time by category over `n` micro-steps (forward + backward), and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for i in range(n):
            fn(i)
        sync(device)
    wall = (time.perf_counter() - t0) / n
    cats = {"attention": ("flash", "fmha", "attention", "sdpa", "cudnn_generated_fort_native_sdpa"),
            "conv": ("conv", "implicit", "xmma", "cudnn", "nchw", "nhwc", "wgrad", "dgrad"),
            "gemm": ("gemm", "cutlass", "sm90_", "cublas", "s16816", "nvjet"),
            "triton(fused elementwise/norm)": ("triton",)}
    totals = {k: 0.0 for k in cats}
    totals["other"] = 0.0
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
        if t <= 0 or e.key.startswith(("ProfilerStep", "aten::", "cuda", "Memcpy", "Memset")) and "Memcpy" not in e.key:
            continue
        name = e.key.lower()
        cat = next((k for k, keys in cats.items() if any(x in name for x in keys)), "other")
        totals[cat] += t / 1e3 / n
        rows.append((t / 1e3 / n, e.count // n, e.key[:110]))
    rows.sort(reverse=True)
    gpu = sum(totals.values())
    print(f"profile: wall {wall * 1e3:.1f} ms/micro-step, kernels {gpu:.1f} ms "
          + ", ".join(f"{k} {v:.1f} ms ({100 * v / gpu:.0f}%)" for k, v in totals.items() if gpu), flush=True)
    for t, c, k in rows[:25]:
        print(f"  {t:8.2f} ms  x{c:<4d} {k}", flush=True)
    return {"wall_ms": wall * 1e3, "kernel_ms": gpu, "by_category_ms": totals,
            "top": [{"ms": t, "calls": c, "kernel": k} for t, c, k in rows[:40]]}


def _time(fn, v: Variant, args, device: torch.device, *, window: int, world: int = 1) -> dict:
    """Warm up (compiles, cudnn autotune, one optimiser step), then time whole accumulation windows."""
    warm = max(args.warmup, window) if not args.tiny else window
    warm = -(-warm // window) * window
    t0 = time.perf_counter()
    for i in range(warm):
        fn(i)
    sync(device)
    warm_s = time.perf_counter() - t0
    n = max(args.steps, window) if not args.tiny else args.steps * window
    n = -(-n // window) * window
    warm_peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(warm, warm + n):
        fn(i)
    sync(device)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    # CUDA-graph pools are allocated while recording (warm-up) and not re-allocated on replay, so the
    # steady-state peak under-counts them: also report the warm-up peak, the reserved peak (pools
    # included) and what the whole device has in use (context, cuDNN workspaces).
    mem = {}
    if device.type == "cuda":
        free_b, total_b = torch.cuda.mem_get_info(device)
        mem = {"peak_incl_warmup_gib": max(peak, warm_peak),
               "reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
               "device_used_gib": (total_b - free_b) / 2**30}
    return {**mem, "variant": v.name, "samples_per_s": n * v.batch * world / dt, "per_gpu_samples_per_s": n * v.batch / dt,
            "peak_gib": peak, "warmup_s": warm_s, "micro_steps": n, "batch": v.batch, "accum": window,
            "optimizer": v.optimizer, "compile": v.compile, "channels_last": v.channels_last,
            "attention": v.attention}


# ----------------------------------------------------------------------------------------- measurements

def matmul_peak(device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 10 * 2 * 8192**3 / (time.perf_counter() - t0)


def datasheet_peak(name: str) -> float:
    return next((v for k, v in DATASHEET_BF16.items() if k in name), float("nan"))


def run_variant(name: str, args, device: torch.device) -> dict:
    v = VARIANTS[name]
    if args.batch:
        v = replace(v, batch=args.batch)
    if args.accum and v.path == "ours":
        v = replace(v, accum=args.accum)
    if args.tiny:
        v = replace(v, compile=False, attention="auto", batch=2)
    free(device)
    try:
        return (run_ref if v.path == "ref" else run_ours)(v, args, device)
    except Exception as exc:  # one broken variant must not hide the others' numbers
        traceback.print_exc()
        return {"variant": name, "error": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        free(device)


# ------------------------------------------------------------------------------ bucket stream (issue 16)

# The aspect-ratio mix of the embedded mini-booru (tasks/ingest/minibooru/generate.py `_size`, the project's
# Danbooru stand-in): 60 % portrait with w/h in {2/3, 3/4, 4/5, 9/16, 0.7}, 15 % square, 25 % landscape in
# {3/2, 4/3, 16/9, 5/4}, each ratio equally likely within its group. Mapped onto the 512² kohya buckets by
# tasks.bucket.core.nearest_bucket, that mass lands on 5 buckets; TAIL_SHARE of it goes, evenly, to the 12
# others (long strips, 4-koma, banners: rare on Danbooru, but every bucket must appear in the stream).
MINIBOORU_RATIO_MIX = ((0.60, (2 / 3, 3 / 4, 4 / 5, 9 / 16, 0.7)), (0.15, (1.0,)),
                      (0.25, (3 / 2, 4 / 3, 16 / 9, 5 / 4)))
TAIL_SHARE = 0.08
# fwd+bwd FLOP of a bucket relative to 512x512, SD1.5 UNet, 77-token context: torch.utils.flop_counter on the
# meta device (attention grows with the token count squared, so it is not simply the pixel ratio).
# Buckets at 768² and 1024² (min_side = resolution / 2, max_side = 2 x resolution, as nai-v2-fm's hires phase).
FLOP_RATIO = {"256x832": 0.7897, "256x896": 0.8586, "256x960": 0.9287, "256x1024": 1.0, "320x704": 0.8413,
              "320x768": 0.9287, "384x640": 0.9287, "448x576": 0.9821, "512x512": 1.0,
              "384x1344": 2.2575, "384x1408": 2.3944, "384x1472": 2.534, "384x1536": 2.6763, "448x1216": 2.4175,
              "448x1280": 2.5811, "512x1088": 2.4872, "512x1152": 2.6763, "576x960": 2.4639, "576x1024": 2.6763,
              "640x896": 2.5811, "704x832": 2.6524, "768x768": 2.6763,
              "512x1856": 5.0713, "512x1920": 5.3177, "512x1984": 5.5688, "512x2048": 5.8247, "576x1664": 5.1324,
              "576x1728": 5.4113, "576x1792": 5.6961, "640x1536": 5.3177, "640x1600": 5.6323, "704x1408": 5.38,
              "704x1472": 5.7282, "768x1280": 5.3177, "768x1344": 5.6961, "832x1216": 5.5371, "896x1152": 5.6961,
              "960x1088": 5.7924, "1024x1024": 5.8247}


def bucket_mix(resolution: int = 512) -> list[tuple[tuple[int, int], float]]:
    """[((width, height) px, probability)] over every bucket of the kohya set at `resolution`², most likely
    first (the stream the bucket benchmark draws micro-batches from)."""
    import numpy as np

    from pipeline_config.bucket import BucketConfig
    from tasks.bucket.core import make_buckets, nearest_bucket

    buckets = make_buckets(BucketConfig(resolution=resolution, min_side=resolution // 2, max_side=2 * resolution))
    mass = np.zeros(len(buckets))
    for share, ratios in MINIBOORU_RATIO_MIX:
        idx = nearest_bucket(np.array(ratios) * 1000.0, np.full(len(ratios), 1000.0), buckets)
        np.add.at(mass, idx, share / len(ratios))
    rest = mass == 0
    mass = mass * (1.0 - TAIL_SHARE) + np.where(rest, TAIL_SHARE / max(1, int(rest.sum())), 0.0)
    order = sorted(range(len(buckets)), key=lambda i: (-mass[i], buckets[i].width))
    return [((buckets[i].width, buckets[i].height), float(mass[i])) for i in order]


def flop_per_sample(w: int, h: int) -> float:
    ratio = FLOP_RATIO.get(f"{min(w, h)}x{max(w, h)}")
    return FLOP_PER_SAMPLE * (ratio if ratio is not None else w * h / 512**2)


def bucket_plan(mix, *, rounds: int, timed: int, window: int, seed: int) -> tuple[list, list]:
    """(prelude, timed) lists of (w, h): the prelude visits every shape `rounds` times, each round in a new
    random order (so warm-up is measured the same way for every path), padded with draws from the mix to
    whole accumulation windows; the timed part is `timed` draws (whole windows) from the mix."""
    import random

    rng = random.Random(seed)
    shapes = [s for s, _ in mix]
    weights = [p for _, p in mix]
    prelude = []
    for _ in range(rounds):
        order = shapes[:]
        rng.shuffle(order)
        prelude += order
    prelude += rng.choices(shapes, weights, k=-len(prelude) % window)
    n = -(-timed // window) * window
    return prelude, rng.choices(shapes, weights, k=n)


def bucket_worker(args) -> dict:
    """One path on the bucket stream, in a process of its own (so the compile caches start as the parent
    arranged: a fresh folder = cold, a used one = warm). Prints one RESULT_PREFIX line."""
    from torch._dynamo.utils import counters

    v = VARIANTS[args.bucket_variant]
    if args.batch:
        v = replace(v, batch=args.batch)
    if args.tiny:  # CPU: compile only with a backend that generates no code (--compile-backend aot_eager)
        v = replace(v, compile=v.compile and args.compile_backend != "inductor", attention="auto", batch=2)
    device = torch.device("cuda" if not args.tiny else "cpu")
    mix = bucket_mix(args.bucket_resolution)[: args.bucket_shapes or None]
    total = sum(p for _, p in mix)
    mix = [(s, p / total) for s, p in mix]
    window = v.accum if v.path == "ours" else 1
    timed_n = args.steps * (1 if not args.tiny else window)
    prelude, timed = bucket_plan(mix, rounds=args.bucket_rounds, timed=timed_n, window=window, seed=0)
    scale = 1 if not args.tiny else 2  # tiny: half the latent side (still a multiple of its 4x down-scaling)
    data = {s: synthetic_batches(2, v.batch, (s[1] // 8 // scale, s[0] // 8 // scale), args.chunks, seed=k)
            for k, (s, _) in enumerate(mix)}
    seen: dict = {}

    def batch_of(s):
        seen[s] = seen.get(s, 0) + 1
        return data[s][seen[s] % 2]

    t0 = time.perf_counter()
    if v.path == "ref":
        step = build_ref(v, args, device)
        micro, window_end = step, (lambda: None)
    else:
        engine = build_ours(v, args, device)

        def window_end() -> None:
            if engine.window_full:
                engine.optimizer_step()

        micro = engine.micro_step
    build_s = time.perf_counter() - t0
    # prelude: one host sync a micro-step, so each step's wall time is its own (compiles, recordings included)
    steps = []
    symbolic = v.compile and v.compile_strategy != "static"
    first_graphs = None
    for s in prelude:
        a = time.perf_counter()
        micro(batch_of(s))
        sync(device)
        b = time.perf_counter()
        steps.append((s, b - a, b - t0))
        print(f"  {v.name} {s[0]}x{s[1]}: {b - a:.2f}s (at {b - t0:.1f}s)", flush=True)
        graphs = counters["stats"].get("unique_graphs", 0)
        first_graphs = graphs if first_graphs is None else first_graphs
        if symbolic and graphs > first_graphs:  # a new shape compiled again: don't spend minutes per shape
            raise RuntimeError(f"compile_strategy={v.compile_strategy} compiled {graphs - first_graphs} more "
                               f"graph(s) at {s[0]}x{s[1]} (see the recompile reasons above)")
        window_end()
    sync(device)
    prelude_s = time.perf_counter() - t0
    # timed: the real stream, no host sync inside; per-step device time from CUDA events
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    events = []
    a = time.perf_counter()
    for s in timed:
        if device.type == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            micro(batch_of(s))
            e1.record()
            events.append((s, e0, e1))
        else:
            micro(batch_of(s))
        window_end()
    sync(device)
    dt = time.perf_counter() - a
    samples = len(timed) * v.batch
    flop = sum(flop_per_sample(*s) for s in timed) * v.batch
    # a shape is "at speed" at its first prelude step no slower than 1.5x the steady device time per latent
    # pixel times its pixels (+5 ms for the host sync); warm-up ends when the last shape gets there
    per_px = sorted(e0.elapsed_time(e1) / 1e3 / (s[0] * s[1]) for s, e0, e1 in events) if events else []
    rate = per_px[len(per_px) // 2] if per_px else dt / max(1, sum(s[0] * s[1] for s in timed))
    at_speed: dict = {}
    first_step: dict = {}
    for s, d, end in steps:
        first_step.setdefault(s, d)
        if s not in at_speed and d <= 1.5 * rate * s[0] * s[1] + 0.005:
            at_speed[s] = end
    missing = [f"{w}x{h}" for (w, h), _ in mix if (w, h) not in at_speed]
    by_shape: dict = {}
    for s, e0, e1 in events:
        by_shape.setdefault(s, []).append(e0.elapsed_time(e1))
    step_ms = {f"{w}x{h}": round(sorted(t)[len(t) // 2], 2) for (w, h), t in by_shape.items()}
    res = {"variant": v.name, "path": v.path, "compile_strategy": v.compile_strategy, "compile_mode": v.compile_mode,
           "cache": args.bucket_phase, "shapes": len(mix), "build_s": build_s,
           "warmup_s": max(at_speed.values()) if not missing else None, "warmup_missing": missing,
           "prelude_s": prelude_s, "prelude_steps": len(prelude), "samples_per_s": samples / dt,
           "per_gpu_samples_per_s": samples / dt, "flop_per_s": flop / dt, "timed_steps": len(timed),
           "batch": v.batch, "accum": window, "optimizer": v.optimizer,
           "first_step_s": {f"{w}x{h}": round(d, 2) for (w, h), d in first_step.items()},
           "step_ms_median": step_ms,  # device time of one micro-step (forward + backward) per shape
           "at_speed_s": {f"{w}x{h}": round(t, 1) for (w, h), t in sorted(at_speed.items(), key=lambda kv: kv[1])},
           "unique_graphs": counters["stats"].get("unique_graphs", 0),
           "inductor": {k: v_ for k, v_ in counters["inductor"].items() if "cache" in k or "compile" in k},
           "aot_autograd": {k: v_ for k, v_ in counters["aot_autograd"].items() if "cache" in k}}
    if device.type == "cuda":
        free_b, total_b = torch.cuda.mem_get_info(device)
        res.update(peak_gib=torch.cuda.max_memory_allocated(device) / 2**30,
                   reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30,
                   device_used_gib=(total_b - free_b) / 2**30)
    print(RESULT_PREFIX + json.dumps(res), flush=True)
    return res


def bucket_bench(args) -> list[dict]:
    """Each path of `--bucket-variants` on the bucket stream, in a fresh process each; compiled paths run
    twice, first with an empty compile cache (cold), then with the cache that run left (warm)."""
    import shutil

    root = Path(args.bucket_cache_root)
    out = []
    pypath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    for spec in [n for n in args.bucket_variants.split(",") if n]:
        # NAME[:PHASES[:SHAPES]], e.g. ours_cg:cold+warm:2 (default: cold+warm for compiled paths, all shapes)
        name, phases, shapes = (spec.split(":") + ["", ""])[:3]
        shapes = shapes or str(args.bucket_shapes)
        v = VARIANTS[name]
        if not phases:
            phases = "cold+warm" if v.compile and not args.tiny else "cold"
        for phase in phases.split("+"):
            cache = root / name
            if phase == "cold":
                shutil.rmtree(cache, ignore_errors=True)
            cache.mkdir(parents=True, exist_ok=True)
            # TORCHINDUCTOR_CACHE_DIR too, for what prepare_unet's keyed folder does not cover (the reference)
            env = {**os.environ, "PYTHONPATH": pypath, "PYTHONUNBUFFERED": "1",
                   "TORCHINDUCTOR_CACHE_DIR": str(cache / "env"), "TRITON_CACHE_DIR": str(cache / "env" / "triton")}
            env.setdefault("TORCH_LOGS", "recompiles")  # why a graph was compiled again, if it was
            cmd = [sys.executable, str(Path(__file__).resolve()), "--bucket-worker", "--bucket-variant", name,
                   "--bucket-phase", phase, "--compile-cache-dir", str(cache), "--steps", str(args.steps),
                   "--bucket-rounds", str(args.bucket_rounds), "--bucket-shapes", shapes,
                   "--chunks", str(args.chunks), "--compile-backend", args.compile_backend,
                   "--bucket-resolution", str(args.bucket_resolution)] + \
                  (["--batch", str(args.batch)] if args.batch else []) + (["--tiny"] if args.tiny else [])
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(ROOT),
                                      timeout=args.bucket_timeout)
                stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
            except subprocess.TimeoutExpired as exc:
                stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
                stderr, rc = "timeout", "timeout"
            wall = time.perf_counter() - t0
            if args.bucket_log_dir:
                log_dir = Path(args.bucket_log_dir)
                log_dir.mkdir(parents=True, exist_ok=True)
                (log_dir / f"bucket-{name}-{phase}.log").write_text(stdout + "\n--- stderr ---\n" + (stderr or ""))
            line = next((ln for ln in stdout.splitlines() if ln.startswith(RESULT_PREFIX)), None)
            if line is None:
                print(stdout[-3000:], (stderr or "")[-5000:], flush=True)
                res = {"variant": f"{name}[{phase}]", "error": f"exit {rc} after {wall:.0f}s"}
            else:
                res = json.loads(line[len(RESULT_PREFIX):])
                partial = res["shapes"] != len(bucket_mix(args.bucket_resolution))
                res["variant"] = f"{name}[{phase}]" + (f"/{res['shapes']}" if partial else "")
                res["process_wall_s"] = wall
            print(RESULT_PREFIX + json.dumps(res), flush=True)
            out.append(res)
            if args.json:  # kept if a later path runs out of time
                Path(args.json).write_text(json.dumps({"bucket_mix": bucket_mix(args.bucket_resolution), "results": out},
                                                      indent=1))
    return out


SEED_RECIPE_SAMPLES = 5.2e6  # 260k posts x 20 epochs (REFERENCE.md's seed recipe)


def print_bucket_table(results: list[dict], sheet: float, project_samples: float = SEED_RECIPE_SAMPLES) -> None:
    refs = {r["shapes"]: r["samples_per_s"] for r in results if r.get("path") == "ref" and "error" not in r}
    print(f"\n{'path[cache]':24s} {'shapes':>6s} {'warm-up s':>9s} {'samples/s':>9s} {'x ref':>6s} {'MFU':>6s} "
          f"{'peak/resv GiB':>13s} {'graphs':>6s}  slowest first steps")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:24s} ERROR {r['error']}")
            continue
        warm = f"{r['warmup_s']:9.1f}" if r["warmup_s"] is not None else f"{'>' + format(r['prelude_s'], '.0f'):>9s}"
        mfu = r["flop_per_s"] / sheet if sheet == sheet else float("nan")
        ref = refs.get(r["shapes"])  # the reference on the same stream
        ratio = f"{r['samples_per_s'] / ref:6.2f}" if ref else "   n/a"
        slow = sorted(r["first_step_s"].items(), key=lambda kv: -kv[1])[:3]
        print(f"{r['variant']:24s} {r['shapes']:6d} {warm} {r['samples_per_s']:9.1f} {ratio} {100 * mfu:5.1f}% "
              f"{r.get('peak_gib', float('nan')):6.2f}/{r.get('reserved_gib', float('nan')):<6.2f} "
              f"{r['unique_graphs']:6d}  {', '.join(f'{k} {v:.0f}s' for k, v in slow)}")
    print(f"projection for {project_samples / 1e6:.2f}M samples on one such GPU (steady rate + the measured warm-up):")
    for r in results:
        if "error" not in r and r["samples_per_s"] > 0:
            hours = (project_samples / r["samples_per_s"] + (r["warmup_s"] or r["prelude_s"])) / 3600
            print(f"  {r['variant']:24s} {hours:6.1f} h")


# ----------------------------------------------------------------------------------- reader (data wait)

def synthetic_cache(root: Path, n: int, px: int):
    """A cache output (real chunk writer, real manifest) of `n` random samples in one px x px bucket, with
    Danbooru-sized captions (~33 tags of 1-3 ids: two CLIP chunks)."""
    import numpy as np
    import pyarrow as pa

    from data_contracts.cache import SEGMENTS, CacheManifest
    from data_contracts.store import ArtifactStore
    from tasks.cache.chunks import chunk_table, plan_chunks, write_chunk

    store = ArtifactStore(str(root), local_cache=root / "local")
    fp = f"benchtrain{n}x{px}"
    if not store.is_complete("cache", fp):
        rng = np.random.default_rng(0)
        work = store.begin("cache", fp, resume=False)
        ids = np.arange(n, dtype=np.int64)
        plans = plan_chunks(ids, np.full(n, px), np.full(n, px), channels=4, downscale=8, store_std=True,
                            chunk_bytes=256e6, row_group_bytes=8e6)
        chunks = []
        per_seg = {"count": 1, "character": 1, "series": 1, "general": 26, "artist": 1, "quality": 3}
        for plan in plans:
            k = plan.stop - plan.start
            meta = {"id": ids[plan.start:plan.stop], "bucket_w": [px] * k, "bucket_h": [px] * k,
                    "flip": [False] * k, "quality_label": ["good score"] * k, "tag_weight": np.ones(k, np.float32)}
            for seg in SEGMENTS:
                toks = [[rng.integers(300, 40000, rng.integers(1, 4)).tolist() for _ in range(per_seg[seg])]
                        for _ in range(k)]
                meta[f"tags_{seg}"] = [[f"t{j}" for j in range(len(r))] for r in toks]
                meta[f"tokens_{seg}"] = toks
                meta[f"tokens_sep_{seg}"] = [[t + [267] for t in r] for r in toks]
            shape = (k, 4, px // 8, px // 8)
            mean = rng.standard_normal(shape, dtype=np.float32).astype(np.float16)
            std = np.abs(rng.standard_normal(shape, dtype=np.float32) * 0.05).astype(np.float16)
            chunks.append(write_chunk(work, plan, chunk_table(pa.table(meta), mean, std)))
        manifest = CacheManifest(stage="cache", contract_version=CacheManifest.CONTRACT_VERSION, fingerprint=fp,
                                 config_digest="bench", code_version="bench", vae_identity="0" * 64,
                                 tokenizer_identity="0" * 64, scaling_factor=0.18215, chunks=chunks,
                                 row_counts={"chunks": n})
        store.commit(manifest, work)
    return store, store.read_manifest(CacheManifest, fp)


def loop_smoke(args, device: torch.device) -> dict:
    """The whole training loop (tasks.train.loop.run_training) with the tiny model on this device: compile,
    bf16 autocast, prefetch + pinning, validation, sample grids, checkpoints, export. Correctness smoke of the
    GPU-only code paths, not a speed figure."""
    import shutil

    from pipeline_config.train import TrainConfig
    from tasks.train.loop import RunSpec, run_training

    root = Path(args.reader_dir) / "loop"
    shutil.rmtree(root / "work", ignore_errors=True)
    store, manifest = synthetic_cache(root, 64, 256)
    cuda = device.type == "cuda"
    train = TrainConfig.model_validate({
        "model": "builtin:tiny-sd15", "batch_size": 4, "grad_accum": 2, "max_steps": 12, "lr": 1e-3,
        "optimizer": "adamw8bit", "mixed_precision": "bf16" if cuda else "no", "compile": cuda,
        "compile_mode": "reduce-overhead" if cuda else "default",  # the preset's CUDA graphs
        "attention_backend": "cudnn" if cuda else "auto", "checkpoint_every": 5, "launcher": "inprocess",
        "ema": {"enabled": True}, "validation": {"fraction": 0.1, "every": 6},
        "sampling": {"every": 6, "prompts": ["a", "b"], "seeds": [0, 1], "steps": 4, "width": 256, "height": 256}})
    spec = RunSpec(train=train.model_dump(mode="json"), work=str(root / "work"), data_root=store.root_url,
                   local_cache=str(store.local_cache), cache_fingerprint=manifest.fingerprint,
                   model_cache_dir=str(root / "models"), device="cuda" if cuda else "cpu")
    t0 = time.perf_counter()
    res = run_training(spec)
    res["variant"] = "loop-smoke(tiny)"
    res["samples_per_s"] = res.get("mean_samples_per_s") or 0.0
    res["loop_wall_s"] = time.perf_counter() - t0
    files = sorted(p.relative_to(root / "work").as_posix() for p in (root / "work").rglob("*") if p.is_file())
    print(f"loop smoke: {res['steps']} steps, final loss {res['final_loss']:.4f}, val {res['validation']}, "
          f"{len(files)} files incl. {[f for f in files if f.endswith(('.png', 'model.safetensors'))]}", flush=True)
    return res


def sampling_check(device: torch.device) -> None:
    """Where a grid goes wrong, if it does: latents and pixels of the tiny model per attention backend."""
    from tasks.models.tiny import build_tiny_models
    from tasks.models.vae import decode_latents
    from tasks.train.engine import configure_backends
    from tasks.train.sampling import sample_flow, seeded_noise

    unet, vae, te = build_tiny_models(0)
    unet, vae = unet.to(device).eval(), vae.to(device).eval()
    ctx = torch.randn(4, 77, 64, device=device)
    for backend in ("auto", "cudnn", "flash", "efficient", "math"):
        configure_backends(device, backend)
        noise = seeded_noise([0, 1], (4, 32, 32)).to(device)
        for amp in (False, True):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                lat = sample_flow(lambda x, t, c: unet(x, t, encoder_hidden_states=c).sample, noise, ctx[:2], ctx[2:],
                                  steps=4, shift=3.0, cfg_scale=6.0)
            with torch.no_grad():  # as the loop does: the VAE decodes in fp32, outside autocast
                px = decode_latents(vae, lat)
            print(f"sampling check {backend:9s} amp={amp}: latents mean {lat.float().mean():.4f} std "
                  f"{lat.float().std():.4f} nan {torch.isnan(lat).any().item()}; pixels std {px.float().std():.4f} "
                  f"nan {torch.isnan(px).any().item()} zero-frac {(px == 0).float().mean():.3f}", flush=True)
    configure_backends(device, "auto")


def reader_bench(args, device: torch.device, variant: str) -> dict:
    """Our step fed by the real ChunkReader + the loop's Prefetcher/prepare_batch over a synthetic cache."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from tasks.cache.reader import ChunkReader
    from tasks.diffusion.objectives import Objective
    from tasks.train.batches import PromptOptions, prepare_batch
    from tasks.train.engine import (
        Engine,
        configure_backends,
        make_optimizer,
        prepare_unet,
    )
    from tasks.train.stream import Prefetcher, epoch_stream

    v = VARIANTS[variant]
    if args.tiny:
        v = replace(v, compile=False, attention="auto", batch=2)
    store, manifest = synthetic_cache(Path(args.reader_dir), args.reader_samples, args.latent * 8)

    free(device)
    AcceleratorState._reset_state(reset_partial_state=True)
    acc = Accelerator(cpu=device.type == "cpu", mixed_precision="no" if args.tiny else "bf16",
                      step_scheduler_with_optimizer=False)
    configure_backends(device, v.attention, cudnn_benchmark=v.cudnn_benchmark)
    unet, te = build_models(args.tiny, device)
    prepare_unet(unet, channels_last=v.channels_last, compile=v.compile)
    te.eval().requires_grad_(False)
    opt = make_optimizer([{"params": list(unet.parameters())}], kind=v.optimizer, lr=1e-5, device=device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    unet, opt = acc.prepare(unet, opt)
    obj = Objective("flow", shift=2.0)
    engine = Engine(acc, unet, opt, sched, obj, grad_accum=v.accum, max_grad_norm=1.0, text_encoder=te,
                    channels_last=v.channels_last)
    reader = ChunkReader(manifest, store, batch_size=v.batch, seed=0, shuffle_buffer=1024, prefetch=4)
    opts = PromptOptions(max_chunks=3, caption_dropout=0.05)
    pin = device.type == "cuda"

    def prep(epoch, batch, state):
        b = prepare_batch(batch, epoch=epoch, seed=0, objective=obj, scaling_factor=0.18215, prompts=opts,
                          holdout_fraction=0.0, reader_state=state)
        return b.pin() if pin else b

    pf = Prefetcher(epoch_stream(reader, 0), prep, depth=4)
    warm_windows, windows = (1, args.steps) if args.tiny else (args.reader_warmup_windows, args.reader_windows)
    chunk_counts: dict[int, int] = {}
    try:
        for w in range(warm_windows + windows):
            if w == warm_windows:
                sync(device)
                t0, wait = time.perf_counter(), 0.0
            for _ in range(v.accum):
                b, waited = pf.next()
                chunk_counts[b.token_ids.shape[1]] = chunk_counts.get(b.token_ids.shape[1], 0) + 1
                engine.micro_step(b)
                if w >= warm_windows:
                    wait += waited
            engine.optimizer_step()
        sync(device)
        dt = time.perf_counter() - t0
    finally:
        pf.close()
    return {"variant": f"{v.name}+reader", "samples_per_s": windows * v.accum * v.batch / dt,
            "data_wait_frac": wait / dt, "reader_wait_s": reader.stats.wait_s, "chunks_seen": chunk_counts,
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")}


# ------------------------------------------------------------------------------------------------- DDP

def ddp_worker(args) -> None:
    """One process of `accelerate launch`: our best variant under DDP; rank 0 prints the result."""
    from accelerate import Accelerator

    if args.tiny:
        args.latent = 8
        torch.set_num_threads(1)
    acc = Accelerator(cpu=args.tiny, mixed_precision="no" if args.tiny else "bf16", step_scheduler_with_optimizer=False)
    device = acc.device
    v = VARIANTS[args.ddp_variant]
    if args.batch:
        v = replace(v, batch=args.batch)
    if args.tiny:
        v = replace(v, compile=False, attention="auto", batch=2)
    res = run_ours(v, args, device, accelerator=acc)
    if acc.is_main_process:
        res["world_size"] = acc.num_processes
        print(RESULT_PREFIX + json.dumps(res), flush=True)
    acc.wait_for_everyone()
    acc.end_training()


def ddp_bench(args) -> list[dict]:
    from tasks.train.launch import cpu_threads_per_process

    out = []
    pypath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": pypath, "NCCL_NVLS_ENABLE": "0", "PYTHONUNBUFFERED": "1"}
    for n in (int(x) for x in args.ddp_sizes.split(",")):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n), "--num_machines", "1",
               "--mixed_precision", "bf16", "--dynamo_backend", "no", "--main_process_port", str(29600 + n),
               "--num_cpu_threads_per_process", str(cpu_threads_per_process(n))]  # as the stage launches
        if n > 1:
            cmd.insert(3, "--multi_gpu")
        cmd += [str(Path(__file__).resolve()), "--ddp-worker", "--ddp-variant", args.ddp_variant,
                "--steps", str(args.steps), "--warmup", str(args.warmup), "--latent", str(args.latent),
                "--chunks", str(args.chunks)] + (["--batch", str(args.batch)] if args.batch else []) + \
              (["--accum", str(args.accum)] if args.accum else []) + (["--tiny"] if args.tiny else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(ROOT))
        line = next((l for l in proc.stdout.splitlines() if l.startswith(RESULT_PREFIX)), None)
        if proc.returncode != 0 or line is None:
            print(proc.stdout[-3000:], proc.stderr[-3000:])
            out.append({"variant": f"ddp{n}", "error": f"exit {proc.returncode}"})
            continue
        res = json.loads(line[len(RESULT_PREFIX):])
        res["variant"] = f"{args.ddp_variant} x{n} GPU"
        print(RESULT_PREFIX + json.dumps(res), flush=True)  # kept if a later size runs out of time
        out.append(res)
    by_world = {r["world_size"]: r for r in out if "error" not in r}
    if 1 in by_world and 2 in by_world:
        by_world[2]["scaling_efficiency"] = by_world[2]["samples_per_s"] / (2 * by_world[1]["samples_per_s"])
    return out


# ------------------------------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=None, help=f"comma list of {', '.join(VARIANTS)} (default {DEFAULT_VARIANTS})")
    ap.add_argument("--steps", type=int, default=28, help="timed micro-steps (rounded up to whole windows)")
    ap.add_argument("--warmup", type=int, default=14, help="untimed micro-steps (at least one window)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--accum", type=int, default=None, help="accumulation for our variants (default 14)")
    ap.add_argument("--latent", type=int, default=64, help="latent side (64 = 512 px)")
    ap.add_argument("--chunks", type=int, default=1, help="CLIP chunks of context (1 = 77 tokens)")
    ap.add_argument("--reader", action="store_true", help="also measure data wait with the real reader")
    ap.add_argument("--reader-variant", default="ours")
    ap.add_argument("--reader-samples", type=int, default=3000)
    ap.add_argument("--reader-windows", type=int, default=3)
    ap.add_argument("--reader-warmup-windows", type=int, default=2)
    ap.add_argument("--reader-dir", default="/tmp/bench-train-cache")
    ap.add_argument("--ddp", action="store_true", help="also measure 1 vs 2 GPU DDP (accelerate launch)")
    ap.add_argument("--ddp-variant", default="ours")
    ap.add_argument("--ddp-sizes", default="1,2", help="process counts to run, in order (efficiency needs 1,2)")
    ap.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tiny", action="store_true", help="tiny UNet on CPU: a smoke test of every path")
    ap.add_argument("--loop", action="store_true", help="also run the whole training loop with the tiny model")
    ap.add_argument("--sampling-check", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--profile", default=None, help="comma list of our variants to profile (kernel time split)")
    ap.add_argument("--buckets", action="store_true",
                    help="also run the bucket stream (17 shapes at 512², bucket_mix): warm-up cold/warm, steady")
    ap.add_argument("--bucket-variants", default="ref,ours_cg_dyn",
                    help="paths on the bucket stream, each NAME[:PHASES[:SHAPES]]: PHASES cold, warm or cold+warm "
                         "(compiled default), SHAPES the N most frequent (default --bucket-shapes)")
    ap.add_argument("--bucket-shapes", type=int, default=0, help="only the N most frequent shapes (0 = all)")
    ap.add_argument("--bucket-resolution", type=int, default=512,
                    help="bucket area side: 512 (17 buckets), 768 or 1024 (a hires phase's buckets)")
    ap.add_argument("--project-samples", type=float, default=SEED_RECIPE_SAMPLES,
                    help="samples the printed projection is for (default: the seed recipe's 5.2M)")
    ap.add_argument("--bucket-rounds", type=int, default=4, help="prelude passes over every shape")
    ap.add_argument("--bucket-cache-root", default="/tmp/bench-train-compile")
    ap.add_argument("--bucket-timeout", type=int, default=900, help="seconds per path process")
    ap.add_argument("--bucket-log-dir", default=None, help="write each path process's output here")
    ap.add_argument("--bucket-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bucket-variant", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--bucket-phase", default="cold", help=argparse.SUPPRESS)
    ap.add_argument("--compile-cache-dir", default=None, help="prepare_unet's compile cache root (runtime.cache_dir)")
    ap.add_argument("--compile-backend", default="inductor", help=argparse.SUPPRESS)  # aot_eager: CPU smoke
    args = ap.parse_args()
    if args.ddp_worker:
        ddp_worker(args)
        return
    if args.bucket_worker:
        if args.tiny:
            torch.set_num_threads(1)
        bucket_worker(args)
        return
    if args.tiny:
        args.latent = 8
        device = torch.device("cpu")
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --tiny for the CPU smoke test")
        device = torch.device("cuda")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    chosen = args.variants if args.variants is not None else (DEFAULT_VARIANTS if not args.tiny else ",".join(VARIANTS))
    names = [n for n in chosen.split(",") if n]
    print(f"device: {name}; torch {torch.__version__}; latents {args.latent}x{args.latent}, "
          f"context {77 * args.chunks} tokens", flush=True)
    peak_mm = matmul_peak(device)
    sheet = datasheet_peak(name)
    results = []
    for n in names:
        t0 = time.perf_counter()
        r = run_variant(n, args, device)
        r["wall_s"] = time.perf_counter() - t0
        results.append(r)
        print(RESULT_PREFIX + json.dumps({k: v for k, v in r.items() if k != "profile"}), flush=True)
    if args.reader:
        r = reader_bench(args, device, args.reader_variant)
        results.append(r)
        print(RESULT_PREFIX + json.dumps(r), flush=True)
    if args.sampling_check:
        sampling_check(device)
    if args.loop:
        r = loop_smoke(args, device)
        results.append(r)
    if args.ddp:
        for r in ddp_bench(args):
            results.append(r)
            print(RESULT_PREFIX + json.dumps(r), flush=True)
    bucket_results = bucket_bench(args) if args.buckets else []
    ref = next((r["samples_per_s"] for r in results if r.get("variant") == "ref" and "error" not in r), None)
    print(f"\nmeasured bf16 matmul 8192^3: {peak_mm / 1e12:.0f} TFLOP/s; datasheet dense bf16: {sheet / 1e12:.0f}")
    print(f"{'variant':22s} {'samples/s':>10s} {'x ref':>6s} {'peak GiB':>9s} {'MFU':>6s} {'MFU(mm)':>8s}  notes")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:22s} ERROR {r['error']}")
            continue
        s = r["samples_per_s"]
        per_gpu = r.get("per_gpu_samples_per_s", s)
        flop = flop_per_sample(8 * args.latent, 8 * args.latent)  # --latent 128: 1024² is 5.8x 512²'s FLOP
        mfu = per_gpu * flop / sheet if sheet == sheet else float("nan")
        mfu_mm = per_gpu * flop / peak_mm if peak_mm == peak_mm else float("nan")
        notes = []
        if "data_wait_frac" in r:
            notes.append(f"data wait {100 * r['data_wait_frac']:.2f}% chunks {r['chunks_seen']}")
        if "scaling_efficiency" in r:
            notes.append(f"DDP scaling {100 * r['scaling_efficiency']:.1f}%")
        if "warmup_s" in r:
            notes.append(f"warm-up {r['warmup_s']:.0f}s, {r.get('optimizer')} accum {r.get('accum')}")
        ratio = f"{s / ref:6.2f}" if ref else "   n/a"
        print(f"{r['variant']:22s} {s:10.1f} {ratio} {r.get('peak_gib', float('nan')):9.2f} {100 * mfu:5.1f}% "
              f"{100 * mfu_mm:7.1f}%  {'; '.join(notes)}")
    if bucket_results:
        mix = bucket_mix(args.bucket_resolution)
        print(f"\nbucket stream ({len(mix)} buckets at {args.bucket_resolution}², mix: "
              + ", ".join(f"{w}x{h} {100 * p:.1f}%" for (w, h), p in mix[:6]) + ", ...)")
        print_bucket_table(bucket_results, sheet, args.project_samples)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "matmul_tflops": peak_mm / 1e12, "results": results,
                                               "bucket_mix": bucket_mix(args.bucket_resolution), "bucket_results": bucket_results},
                                              indent=1))


if __name__ == "__main__":
    main()
