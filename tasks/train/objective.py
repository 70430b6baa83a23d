"""The training objectives as pure tensor math: rectified flow (default) and SD1.5's DDPM ε-prediction.

Flow (SD3 paper; ComfyUI CONST / diffusers FlowMatchEulerDiscreteScheduler agree):
    x_t = (1 − σ)·x0 + σ·ε,  target v = ε − x0,  UNet timestep = σ·1000 (a float),
    σ ~ uniform(0,1) or sigmoid(N(m, s²)), then shifted σ' = s·σ / (1 + (s − 1)·σ).
DDPM (SD1.5's own scaled-linear schedule, 1000 steps):
    x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε,  target ε,  UNet timestep = t (an integer 0..999).

Randomness is drawn by the caller (per sample, see `draw_noise_levels`) so that a sample's noise does not
depend on which process or batch it lands in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NUM_TRAIN_TIMESTEPS = 1000
SD15_BETA_START = 0.00085
SD15_BETA_END = 0.012


def shift_sigma(sigma: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """σ' = s·σ / (1 + (s − 1)·σ): s > 1 moves mass towards noise; s = 1 is the identity."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sigma_from_uniform(u: torch.Tensor, mode: str, mean: float = 0.0, std: float = 1.0,
                       normal: torch.Tensor | None = None) -> torch.Tensor:
    """Unshifted σ from a uniform draw (mode "uniform") or a standard normal draw ("logit_normal")."""
    if mode == "uniform":
        return u
    if mode == "logit_normal":
        if normal is None:
            raise ValueError("logit_normal sampling needs a standard normal draw")
        return torch.sigmoid(mean + std * normal)
    raise ValueError(f"unknown timestep sampling {mode!r}")


def flow_noisy(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = _bcast(sigma, x0)
    return (1 - s) * x0 + s * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = ε − x0 (InstaFlow's opposite sign is NOT used)."""
    return noise - x0


def flow_timestep(sigma: torch.Tensor) -> torch.Tensor:
    return sigma * NUM_TRAIN_TIMESTEPS


def flow_denoised(x_t: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x̂0 = x_t − σ·v̂."""
    return x_t - _bcast(sigma, x_t) * v


def cosmap_weight(sigma: torch.Tensor) -> torch.Tensor:
    """SD3's 'cosmap' loss weighting 2 / (π·(1 − 2σ + 2σ²)), mean ≈ 1 over uniform σ."""
    return 2.0 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))


def sd15_alphas_cumprod(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """ᾱ_t of SD1.5's scaled-linear schedule: β = linspace(√0.00085, √0.012, 1000)²."""
    betas = torch.linspace(SD15_BETA_START**0.5, SD15_BETA_END**0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(dtype)


def ddpm_noisy(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
               alphas_cumprod: torch.Tensor | None = None) -> torch.Tensor:
    ac = (alphas_cumprod if alphas_cumprod is not None else sd15_alphas_cumprod()).to(x0.device)
    a = ac[t.long()].to(torch.float32)
    return _bcast(a.sqrt(), x0) * x0 + _bcast((1 - a).sqrt(), x0) * noise


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(v, device=like.device, dtype=like.dtype)
    return v.reshape(-1, *([1] * (like.dim() - 1))) if v.dim() else v


@dataclass(frozen=True)
class NoiseLevels:
    """Per-sample noise levels of a batch: σ (flow, already shifted) or t (ddpm)."""

    sigma: torch.Tensor | None = None  # float32 [B]
    t: torch.Tensor | None = None  # int64 [B]


@dataclass(frozen=True)
class Objective:
    kind: str = "flow"  # flow | ddpm
    shift: float = 2.0
    sampling: str = "logit_normal"  # uniform | logit_normal
    logit_mean: float = 0.0
    logit_std: float = 1.0
    weighting: str = "none"  # none | cosmap

    @classmethod
    def from_config(cls, cfg) -> "Objective":
        return cls(cfg.objective, cfg.shift, cfg.timestep_sampling, cfg.logit_mean, cfg.logit_std,
                   cfg.timestep_weighting)

    def draw(self, generator: torch.Generator) -> tuple[float, int]:
        """One sample's noise level from its own generator: (σ shifted, 0) for flow, (0.0, t) for ddpm."""
        if self.kind == "ddpm":
            return 0.0, int(torch.randint(0, NUM_TRAIN_TIMESTEPS, (1,), generator=generator))
        u = torch.rand(1, generator=generator, dtype=torch.float64)
        n = torch.randn(1, generator=generator, dtype=torch.float64)
        sigma = sigma_from_uniform(u, self.sampling, self.logit_mean, self.logit_std, n)
        return float(shift_sigma(sigma, self.shift)), 0

    def levels(self, sigma: list[float], t: list[int]) -> NoiseLevels:
        if self.kind == "ddpm":
            return NoiseLevels(t=torch.tensor(t, dtype=torch.long))
        return NoiseLevels(sigma=torch.tensor(sigma, dtype=torch.float32))

    def fixed_levels(self, grid: list[float], n: int) -> NoiseLevels:
        """The validation grid: σ values (flow) or t = round(σ·999) (ddpm), repeated for n samples each."""
        if self.kind == "ddpm":
            t = [int(round(s * (NUM_TRAIN_TIMESTEPS - 1))) for s in grid for _ in range(n)]
            return NoiseLevels(t=torch.tensor(t, dtype=torch.long))
        return NoiseLevels(sigma=torch.tensor([s for s in grid for _ in range(n)], dtype=torch.float32))

    def inputs(self, x0: torch.Tensor, noise: torch.Tensor, levels: NoiseLevels
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, unet timestep, target, per-sample timestep weight) — all on x0's device."""
        if self.kind == "ddpm":
            t = levels.t.to(x0.device)
            x_t = ddpm_noisy(x0, noise, t)
            weight = torch.ones(x0.shape[0], device=x0.device, dtype=torch.float32)
            return x_t, t, noise, weight
        sigma = levels.sigma.to(device=x0.device, dtype=torch.float32)
        x_t = flow_noisy(x0, noise, sigma)
        weight = cosmap_weight(sigma) if self.weighting == "cosmap" else torch.ones_like(sigma)
        return x_t, flow_timestep(sigma), flow_target(x0, noise), weight


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss = mean over the batch of weight_i · mean_pixels((pred_i − target_i)²), in fp32.

    The weight is tag_weight × timestep weight (× 0 for held-out samples). Returns (loss, per-sample mse).
    """
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    return (per_sample * weight.float()).mean(), per_sample.detach()
