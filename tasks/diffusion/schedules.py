"""Noise schedules: SD1.5's DDPM table and the flow-matching sampling sigmas (σ=1 pure noise … σ=0 clean).

SD1.5 (ε-prediction): scaled-linear betas β = linspace(√0.00085, √0.012, 1000)², ᾱ_t = Π(1 − β), as VE
sigmas s_t = √((1 − ᾱ_t)/ᾱ_t) for samplers. Flow sampling: N+1 descending sigmas.

Two schedules, both built on the SD3 shift σ' = s·σ / (1 + (s − 1)·σ):

``diffusers`` (default) — bit-for-bit what ``FlowMatchEulerDiscreteScheduler(shift=s).set_timesteps(N)``
    produces (diffusers 0.42): its constructor shifts the 1000-entry table t/1000, so
    ``sigma_min = shift(1/1000)``; ``set_timesteps`` then takes ``linspace(1, sigma_min, N)`` and shifts
    it *again*, and appends a final 0. The low end is therefore shifted twice: for s=3, N=48 the last
    non-zero sigma is shift(shift(0.001)) ≈ 0.0089.

``simple`` — ComfyUI's ``simple`` scheduler over ``ModelSamplingSD3(shift)``'s table
    σ_j = shift(j/1000), j = 1..1000: step x takes entry ``table[-(1 + int(x·1000/N))]``, then 0.
    That is (up to the 1/1000 grid) ``shift(linspace(1, 1/N, N))``: the last non-zero sigma is
    shift(1/N) (≈ 0.059 for s=3, N=48), so ComfyUI spends its final step on a much larger jump and
    never visits the σ < 0.05 region diffusers finishes in. Both start at exactly σ=1; the largest
    per-step difference for s=3, N=48 is ≈ 0.05 at the tail. Images differ slightly; neither is wrong.

Timesteps fed to the UNet are σ·1000 as floats (ComfyUI ModelSamplingSD3 multiplier 1000).
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from data_contracts.errors import ConfigError

NUM_TRAIN_TIMESTEPS = 1000
SD15_BETA_START = 0.00085
SD15_BETA_END = 0.012
Schedule = Literal["diffusers", "simple"]
SCHEDULES: tuple[str, ...] = ("diffusers", "simple")


def shift_sigmas(sigmas, shift: float):
    """SD3 time shift σ' = s·σ / (1 + (s − 1)·σ): s > 1 moves mass towards noise, s = 1 is the identity; works
    on floats, numpy arrays and tensors."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sd15_alphas_cumprod(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """ᾱ_t of SD1.5's scaled-linear schedule: β = linspace(√0.00085, √0.012, 1000)²."""
    betas = torch.linspace(SD15_BETA_START**0.5, SD15_BETA_END**0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(dtype)


def sd15_ve_sigmas() -> torch.Tensor:
    """SD1.5's DDPM table as VE sigmas s_t = √((1 − ᾱ_t)/ᾱ_t), t = 0..999 (float64)."""
    acp = sd15_alphas_cumprod()
    return ((1 - acp) / acp) ** 0.5


def _check(steps: int, shift: float) -> None:
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    if not shift > 0:
        raise ConfigError(f"shift must be > 0, got {shift} (the recipe infers with 3–4)")


def diffusers_flow_sigmas(steps: int, shift: float) -> torch.Tensor:
    """The sigmas of FlowMatchEulerDiscreteScheduler(shift=shift) after set_timesteps(steps) (float32)."""
    _check(steps, shift)
    # Constructor: float32 table t = 1000..1 -> sigma = shift(t/1000); sigma_min is its last entry.
    table = torch.from_numpy(np.linspace(1, NUM_TRAIN_TIMESTEPS, NUM_TRAIN_TIMESTEPS, dtype=np.float32)[::-1].copy())
    table = shift_sigmas(table / NUM_TRAIN_TIMESTEPS, shift)
    sigma_max, sigma_min = table[0].item(), table[-1].item()
    # set_timesteps: float64 linspace of timesteps, back to sigmas, shifted again, cast to float32.
    ts = np.linspace(sigma_max * NUM_TRAIN_TIMESTEPS, sigma_min * NUM_TRAIN_TIMESTEPS, steps)
    sig = shift_sigmas(ts / NUM_TRAIN_TIMESTEPS, shift)
    sig = torch.from_numpy(sig).to(torch.float32)
    return torch.cat([sig, torch.zeros(1)])


def comfy_sd3_table(shift: float, timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """ComfyUI ModelSamplingSD3's sigma table: shift(j/timesteps), j = 1..timesteps (ascending, float32)."""
    t = torch.arange(1, timesteps + 1, 1) / timesteps
    return t if shift == 1.0 else shift_sigmas(t, shift)


def comfy_simple_sigmas(steps: int, shift: float) -> torch.Tensor:
    """ComfyUI ``simple`` scheduler over the ModelSamplingSD3(shift) table (float32, final 0 appended)."""
    _check(steps, shift)
    table = comfy_sd3_table(shift)
    stride = len(table) / steps
    sig = [float(table[-(1 + int(x * stride))]) for x in range(steps)]
    return torch.tensor(sig + [0.0], dtype=torch.float32)


def flow_sigmas(steps: int, shift: float = 3.0, schedule: Schedule = "diffusers") -> torch.Tensor:
    """N+1 descending float32 sigmas for ``steps`` sampling steps (first 1.0, last 0.0)."""
    if schedule == "diffusers":
        return diffusers_flow_sigmas(steps, shift)
    if schedule == "simple":
        return comfy_simple_sigmas(steps, shift)
    raise ConfigError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def sigma_to_timestep(sigma: torch.Tensor | float) -> torch.Tensor | float:
    """The UNet's timestep input for a flow sigma: σ·1000 (a float, not rounded)."""
    return sigma * NUM_TRAIN_TIMESTEPS
