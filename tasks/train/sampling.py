"""Minimal samplers for training sample grids (the full sampler library is tasks/sample/).

Flow: Euler on the sigmas of diffusers' FlowMatchEulerDiscreteScheduler (tasks/diffusion/schedules.py, as `fm sample`):
    v̂ = uncond + cfg·(cond − uncond);  x ← x + (σ_next − σ)·v̂.
DDPM (ε-prediction, SD1.5 schedule): Euler in k-diffusion's σ = √((1−ᾱ)/ᾱ) parameterisation.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from tasks.diffusion.schedules import NUM_TRAIN_TIMESTEPS, flow_sigmas, sd15_alphas_cumprod

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, timestep, context) -> out


def _cfg(model: Denoiser, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
         scale: float) -> torch.Tensor:
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond]))
    u, c = out.float().chunk(2)
    return u + scale * (c - u)


@torch.no_grad()
def sample_flow(model: Denoiser, noise: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, *, steps: int,
                shift: float, cfg_scale: float) -> torch.Tensor:
    sigmas = flow_sigmas(steps, shift).to(noise.device)
    x = noise.float()
    for i in range(steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        t = (s * NUM_TRAIN_TIMESTEPS).expand(x.shape[0])
        v = _cfg(model, x, t, cond, uncond, cfg_scale)
        x = x + (s_next - s) * v
    return x


@torch.no_grad()
def sample_ddpm(model: Denoiser, noise: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, *, steps: int,
                cfg_scale: float) -> torch.Tensor:
    ac = sd15_alphas_cumprod()
    all_sigmas = ((1 - ac) / ac).sqrt()
    ts = torch.linspace(NUM_TRAIN_TIMESTEPS - 1, 0, steps, dtype=torch.float64).round().long()
    sigmas = torch.cat([all_sigmas[ts], torch.zeros(1, dtype=torch.float64)]).float().to(noise.device)
    x = noise.float() * sigmas[0]
    for i in range(steps):
        s = sigmas[i]
        eps = _cfg(model, x / (s**2 + 1).sqrt(), ts[i].to(noise.device).expand(x.shape[0]), cond, uncond, cfg_scale)
        x = x + (sigmas[i + 1] - s) * eps  # d = (x − x̂0)/σ = ε
    return x


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[-1,1] NCHW -> uint8 NHWC."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: np.ndarray, path: Path, cols: int, *, prompts: Sequence[str] | None = None,
              seeds: Sequence[int] | None = None) -> Path:
    """Write the grid (rows: prompts, columns: seeds). Given the prompts and seeds, every tile gets a
    caption "seed N" + the prompt, wrapped and cut to the tile width; without them, bare tiles."""
    n, h, w, c = images.shape
    path.parent.mkdir(parents=True, exist_ok=True)
    if prompts is not None and seeds is not None:
        from tasks.sample.grid import make_grid

        labels = [f"seed {seeds[i % cols]}\n{prompts[i // cols]}" for i in range(n)]
        img = make_grid([Image.fromarray(a) for a in images], cols=cols, labels=labels, label_lines=3)
    else:
        rows = -(-n // cols)
        grid = np.full((rows * h, cols * w, c), 255, dtype=np.uint8)
        for i in range(n):
            r, col = divmod(i, cols)
            grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = images[i]
        img = Image.fromarray(grid)
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    tmp.replace(path)
    return path


def seeded_noise(seeds: Sequence[int], shape: tuple[int, int, int]) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
