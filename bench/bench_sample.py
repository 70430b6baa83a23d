"""Sampling throughput and parity: `fm sample`'s pipeline (tasks/sample) against diffusers' StableDiffusionPipeline
with FlowMatchEulerDiscreteScheduler(shift=3) on the same components, in the same run.

Real SD1.5 shapes with random weights (bench/sd15_shapes.py): UNet + CLIP-L in fp16, VAE in fp32 (both sides),
Euler, CFG 6, 768x1024 by default. Both paths get the same prompt embeddings (our A1111/CLIP-skip-2 encoder),
the same per-image CPU-seeded noise and run the same number of UNet calls, so the ratio shows the sampler
loop's overhead, and the images must agree (max |Δ| per uint8 channel is printed).

    python bench/bench_sample.py                         # 768x1024, batch 4, 48 steps
    python bench/bench_sample.py --steps 28 --batch 8 --size 512x768
    python bench/bench_sample.py --tiny --steps 4        # CPU smoke test with builtin:tiny-sd15

Prints seconds per batch, images/s, UNet calls/s, our/ref speed ratio, UNet MFU (FLOPs of one CFG UNet call
counted with torch.utils.flop_counter, against the card's datasheet fp16 dense peak), the device name.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATASHEET_FP16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}


def components(tiny: bool, device: str, cache: Path):
    from tasks.models.load import SD15Components
    from tasks.models.tokenizer import load_tokenizer

    if tiny:
        from tasks.sample.main import load_for_sampling

        return load_for_sampling("builtin:tiny-sd15", cache_dir=cache, device=device,
                                 dtype=torch.float32).components
    from bench.sd15_shapes import build_random_sd15_text_encoder, build_random_sd15_unet, build_random_sd15_vae

    return SD15Components(unet=build_random_sd15_unet(torch.float16, device),
                          vae=build_random_sd15_vae(torch.float32, device),
                          text_encoder=build_random_sd15_text_encoder(torch.float16, device),
                          tokenizer=load_tokenizer(None, cache_dir=cache))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def unet_flops(unet, batch: int, h: int, w: int, tokens: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    p = next(unet.parameters())
    x = torch.randn(2 * batch, unet.config.in_channels, h // 8, w // 8, device=p.device, dtype=p.dtype)
    ctx = torch.randn(2 * batch, tokens, unet.config.cross_attention_dim, device=p.device, dtype=p.dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor(500.0, device=p.device), encoder_hidden_states=ctx)
    return float(counter.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", default="768x1024", help="WxH, multiples of 8")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusionPipeline

    from tasks.models.vae import decode_latents
    from tasks.sample.pipeline import SampleSettings, generate_latents, latents_to_images
    from tasks.sample.prompt import encode_prompt_pair

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    w, h = (int(v) for v in args.size.lower().split("x"))
    if args.tiny:
        w, h = min(w, 64), min(h, 64)
    cache = Path(tempfile.mkdtemp(prefix="bench-sample-"))
    comp = components(args.tiny, device, cache)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    prompts = ["1girl, solo, (long hair:1.2), looking at viewer, smile, masterpiece, good score"] * args.batch
    negative = ["(worst quality, bad score:1.1), sketch"] * args.batch
    seeds = list(range(args.batch))
    settings = SampleSettings(steps=args.steps, cfg=6.0, shift=3.0, sampler="euler", width=w, height=h)

    def ours():
        lat = generate_latents(comp, prompts, negative, seeds, settings)
        with torch.no_grad():
            return latents_to_images(decode_latents(comp.vae, lat))

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.init_noise_sigma = 1.0
    pipe = StableDiffusionPipeline(vae=comp.vae, text_encoder=comp.text_encoder, tokenizer=comp.tokenizer,
                                   unet=comp.unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def ref():
        cond, uncond = encode_prompt_pair(comp.text_encoder, comp.tokenizer, prompts, negative)
        # The pipeline decodes in the VAE's dtype: hand it fp32 latents like ours (output_type="latent" + decode).
        lat = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=args.steps,
                   guidance_scale=6.0, width=w, height=h, output_type="latent",
                   generator=[torch.Generator("cpu").manual_seed(s) for s in seeds]).images
        with torch.no_grad():
            return latents_to_images(decode_latents(comp.vae, lat.float()))

    timings = {}
    images = {}
    for label, fn in (("ref (diffusers)", ref), ("ours (tasks.sample)", ours)):
        fn()  # warm-up
        sync(device)
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            images[label] = fn()
            sync(device)
            best = min(best, time.perf_counter() - t0)
        timings[label] = best
    a, b = (np.stack([np.asarray(im, dtype=np.int16) for im in images[k]]) for k in images)
    diff = int(np.abs(a - b).max())
    flops = unet_flops(comp.unet, args.batch, h, w, 77)
    peak = next((v for k, v in DATASHEET_FP16.items() if k in name), None)
    print(f"device: {name}; {w}x{h}, batch {args.batch}, {args.steps} Euler steps, CFG 6 (one UNet call of "
          f"batch {2 * args.batch} per step), UNet {next(comp.unet.parameters()).dtype}")
    print(f"UNet FLOPs per CFG call: {flops / 1e12:.2f} TFLOP")
    ref_t = timings["ref (diffusers)"]
    for label, t in timings.items():
        achieved = flops * args.steps / t
        mfu = f", UNet MFU {100 * achieved / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s" if peak else ""
        print(f"{label:22s} {t:7.3f} s/batch  {args.batch / t:7.3f} img/s  {args.steps / t:7.2f} UNet calls/s  "
              f"ratio vs ref {ref_t / t:5.3f}  ({achieved / 1e12:.1f} TFLOP/s{mfu})")
    print(f"max |ours - diffusers| per uint8 channel: {diff}")


if __name__ == "__main__":
    main()
