"""Text -> images with an SD1.5 UNet trained for rectified flow (or, for A/B runs, for DDPM ε).

The same steps diffusers' StableDiffusionPipeline takes with a FlowMatchEulerDiscreteScheduler, so the
two agree image for image (tests/sample/test_diffusers_parity.py):
  1. prompts -> CLIP-skip-2, A1111-weighted, 77·K-token conditioning (``prompt.encode_prompt_pair``);
  2. image j starts from ``randn((1, 4, H/8, W/8), generator=cpu Generator(seed + j))`` × σ_0 — noise
     drawn on the CPU, so a seed gives the same image on any device and in any batch;
  3. the sampler integrates v̂ = v_u + cfg·(v_c − v_u) (one batched UNet call, uncond first, timestep σ·1000);
  4. the VAE decodes latents / scaling_factor; pixels (x/2 + 0.5) × 255, rounded.

``prediction="epsilon"`` runs an SD1.5 ε-prediction model through the same flow samplers by an exact
change of variables: a DDPM state x_t = √ᾱ·x0 + √(1−ᾱ)·ε is the flow state x_σ = x_t·(1 − σ)/√ᾱ with
σ = s/(1 + s), s = √((1 − ᾱ)/ᾱ). The model sees x_σ·√ᾱ/(1 − σ) at the (interpolated) timestep of s,
and x̂0 = x_σ/(1 − σ) − s·ε̂. Its schedule is SD1.5's scaled-linear table (shift does not apply).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from PIL import Image

from data_contracts.errors import ConfigError
from tasks.models.vae import decode_latents
from tasks.sample.prompt import encode_prompt_pair
from tasks.sample.samplers import SAMPLER_LABELS, check_sampler, sample
from tasks.diffusion.schedules import NUM_TRAIN_TIMESTEPS, SCHEDULES, flow_sigmas, sd15_ve_sigmas

Prediction = Literal["flow", "epsilon"]
ProgressFn = Callable[[int, int], None]  # (images done, images total)
LATENT_STRIDE = 8


@dataclass(frozen=True)
class SampleSettings:
    steps: int = 48
    cfg: float = 6.0
    shift: float = 3.0
    sampler: str = "euler"
    schedule: str = "diffusers"      # "diffusers" (FlowMatchEulerDiscreteScheduler) | "simple" (ComfyUI)
    width: int = 768
    height: int = 1024
    clip_skip: int = 2
    eta: float = 1.0                 # noise of the ancestral / SDE samplers
    prediction: Prediction = "flow"
    max_chunks: int | None = None    # None: as many 75-token chunks as the prompt needs

    def check(self) -> "SampleSettings":
        check_sampler(self.sampler)
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        for name in ("width", "height"):
            v = getattr(self, name)
            if v < LATENT_STRIDE or v % LATENT_STRIDE:
                raise ConfigError(f"{name} must be a positive multiple of {LATENT_STRIDE}, got {v}")
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.cfg < 0:
            raise ConfigError(f"cfg must be >= 0, got {self.cfg}")
        if self.prediction not in ("flow", "epsilon"):
            raise ConfigError(f"prediction must be 'flow' or 'epsilon', got {self.prediction!r}")
        if self.clip_skip < 1:
            raise ConfigError(f"clip_skip must be >= 1, got {self.clip_skip}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------- ε-model support

def epsilon_flow_sigmas(steps: int, schedule: str = "diffusers") -> torch.Tensor:
    """Sampling sigmas of an ε-model, in flow units σ = s/(1+s), final 0 appended (float32).

    "diffusers": EulerDiscreteScheduler's linspace timesteps (999 … 0) interpolated in the table;
    "simple": ComfyUI ``simple`` over the same 1000-entry table.
    """
    table = sd15_ve_sigmas()
    if schedule == "simple":
        stride = len(table) / steps
        ve = torch.stack([table[-(1 + int(x * stride))] for x in range(steps)])
    else:
        t = np.linspace(0, NUM_TRAIN_TIMESTEPS - 1, steps)[::-1].copy()
        ve = torch.from_numpy(np.interp(t, np.arange(NUM_TRAIN_TIMESTEPS), table.numpy()))
    sig = (ve / (1 + ve)).to(torch.float32)
    return torch.cat([sig, torch.zeros(1)])


def _ve_to_timestep(ve: float, log_table: torch.Tensor) -> float:
    """Continuous DDPM timestep of a VE sigma: linear interpolation in log sigma (k-diffusion)."""
    return float(np.interp(math.log(ve), log_table.numpy(), np.arange(len(log_table))))


# -------------------------------------------------------------------------------- the sampler loop

def sampling_sigmas(settings: SampleSettings) -> torch.Tensor:
    if settings.prediction == "epsilon":
        return epsilon_flow_sigmas(settings.steps, settings.schedule)
    return flow_sigmas(settings.steps, settings.shift, settings.schedule)  # type: ignore[arg-type]


def make_velocity_fn(unet, cond: torch.Tensor, uncond: torch.Tensor | None, cfg: float,
                     prediction: Prediction = "flow"):
    """v̂(x, σ) with CFG: one UNet call on [uncond; cond] (uncond first, as diffusers)."""
    p = next(unet.parameters())
    dtype, device = p.dtype, p.device
    emb = (torch.cat([uncond, cond]) if uncond is not None else cond).to(device=device, dtype=dtype)
    log_table = sd15_ve_sigmas().log() if prediction == "epsilon" else None

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        x_in = torch.cat([x, x]) if uncond is not None else x
        if prediction == "flow":
            t = torch.tensor(sigma, dtype=torch.float32) * NUM_TRAIN_TIMESTEPS
            out = unet(x_in.to(device=device, dtype=dtype), t.to(device), encoder_hidden_states=emb).sample
        else:
            ve = sigma / (1.0 - sigma)
            c_in = 1.0 / ((1.0 - sigma) * math.sqrt(1.0 + ve * ve))
            t = torch.tensor(_ve_to_timestep(ve, log_table), dtype=torch.float32)
            eps = unet((x_in * c_in).to(device=device, dtype=dtype), t.to(device), encoder_hidden_states=emb).sample
            x0 = x_in.to(eps.dtype) / (1.0 - sigma) - ve * eps
            out = (x_in.to(eps.dtype) - x0) / sigma
        out = out.to(torch.float32)
        if uncond is not None:
            v_u, v_c = out.chunk(2)
            out = v_u + cfg * (v_c - v_u)
        return out

    return velocity


def initial_noise(seeds: Sequence[int], channels: int, height: int, width: int) -> torch.Tensor:
    """One CPU-generated standard normal latent per seed, stacked ([B, C, H/8, W/8], float32)."""
    shape = (1, channels, height // LATENT_STRIDE, width // LATENT_STRIDE)
    return torch.cat([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds])


def latents_to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """Pixels in [-1, 1] (N,3,H,W) -> PIL images, rounded like diffusers' image processor."""
    arr = (pixels.detach().to(torch.float32) / 2 + 0.5).clamp(0, 1)
    arr = (arr.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arr]


@torch.no_grad()
def generate_latents(components, prompts: Sequence[str], negatives: Sequence[str], seeds: Sequence[int],
                     settings: SampleSettings, *, callback=None) -> torch.Tensor:
    """One batch: final latents [B, 4, H/8, W/8] (float32) for the given prompts and seeds."""
    settings.check()
    unet, te, tok = components.unet, components.text_encoder, components.tokenizer
    device = next(unet.parameters()).device
    cond, uncond = encode_prompt_pair(te, tok, list(prompts), list(negatives), clip_skip=settings.clip_skip,
                                      max_chunks=settings.max_chunks)
    use_cfg = settings.cfg > 1.0  # as diffusers: cfg <= 1 skips the unconditional pass
    velocity = make_velocity_fn(unet, cond, uncond if use_cfg else None, settings.cfg, settings.prediction)
    sigmas = sampling_sigmas(settings)
    x = initial_noise(seeds, unet.config.in_channels, settings.height, settings.width).to(device)
    x = x * float(sigmas[0])
    gens = None
    if settings.sampler in ("euler_ancestral", "dpmpp_sde"):
        # Per-image noise stream, seeded apart from the initial noise (A1111 also offsets subseeds).
        gens = [torch.Generator("cpu").manual_seed(int(s) + 0x5EED) for s in seeds]
    return sample(settings.sampler, velocity, x, sigmas, generators=gens, eta=settings.eta, callback=callback)


def _as_list(value: str | Sequence[str], n: int, what: str) -> list[str]:
    if isinstance(value, str):
        return [value] * n
    value = list(value)
    if len(value) == 1:
        return value * n
    if len(value) != n:
        raise ConfigError(f"{len(value)} {what} for {n} prompts; give one, or one per prompt")
    return value


@torch.no_grad()
def generate(components, prompts: str | Sequence[str], negative: str | Sequence[str] = "", *,
             steps: int = 48, cfg: float = 6.0, shift: float = 3.0, sampler: str = "euler",
             seed: int = 0, width: int = 768, height: int = 1024, batch_size: int = 1,
             images_per_prompt: int = 1, schedule: str = "diffusers", clip_skip: int = 2, eta: float = 1.0,
             prediction: Prediction = "flow", max_chunks: int | None = None,
             progress: ProgressFn | None = None) -> list[Image.Image]:
    """Images for ``prompts`` (each ``images_per_prompt`` times), prompt-major; image j uses seed + j.

    ``batch_size`` is how many images go through the UNet together; it does not change the images.
    """
    settings = SampleSettings(steps=steps, cfg=cfg, shift=shift, sampler=sampler, schedule=schedule,
                              width=width, height=height, clip_skip=clip_skip, eta=eta,
                              prediction=prediction, max_chunks=max_chunks).check()
    plist = [prompts] if isinstance(prompts, str) else list(prompts)
    if not plist:
        raise ConfigError("no prompts given")
    nlist = _as_list(negative, len(plist), "negative prompts")
    jobs = [(p, n) for p, n in zip(plist, nlist) for _ in range(max(1, images_per_prompt))]
    images: list[Image.Image] = []
    bs = max(1, batch_size)
    for start in range(0, len(jobs), bs):
        part = jobs[start:start + bs]
        seeds = [seed + start + i for i in range(len(part))]
        lat = generate_latents(components, [p for p, _ in part], [n for _, n in part], seeds, settings)
        images += latents_to_images(decode_latents(components.vae, lat))
        if progress is not None:
            progress(len(images), len(jobs))
    return images


def sampler_label(name: str) -> str:
    return SAMPLER_LABELS[check_sampler(name)]
