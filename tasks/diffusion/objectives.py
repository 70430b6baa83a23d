"""The training objectives: rectified flow (default) and SD1.5's DDPM ε-prediction, one class each.

Flow (SD3 paper; ComfyUI CONST / diffusers FlowMatchEulerDiscreteScheduler agree):
    x_t = (1 − σ)·x0 + σ·ε,  target v = ε − x0,  UNet timestep = σ·1000 (a float),
    σ ~ uniform(0,1) or sigmoid(N(m, s²)), then shifted σ' = s·σ / (1 + (s − 1)·σ).
DDPM (SD1.5's own scaled-linear schedule, 1000 steps):
    x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε,  target ε,  UNet timestep = t (an integer 0..999).

Each objective answers what training needs (noise levels, inputs and targets), what samplers need (its
`prediction`, the quick grid sampler) and what exported files say about it (`metadata`). Randomness is drawn by
the caller (per sample, see `draw`) so that a sample's noise does not depend on which process or batch it lands in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from data_contracts.errors import ConfigError
from tasks.diffusion.schedules import NUM_TRAIN_TIMESTEPS, SD15_BETA_END, SD15_BETA_START, sd15_alphas_cumprod
from tasks.diffusion.schedules import shift_sigmas as shift_sigma

__all__ = ["NUM_TRAIN_TIMESTEPS", "SD15_BETA_END", "SD15_BETA_START", "Epsilon", "Flow", "NoiseLevels", "OBJECTIVES",
           "Objective", "objective_named", "sd15_alphas_cumprod", "shift_sigma", "weighted_mse"]


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


class _ByName(type):
    """`Objective("flow", shift=2.0)` builds the objective of that name (a subclass); subclasses build as usual."""

    def __call__(cls, *args: Any, **kwargs: Any):
        if cls is Objective:
            name = args[0] if args else kwargs.pop("kind", "flow")
            return objective_named(name)(*args[1:], **kwargs)
        return super().__call__(*args, **kwargs)


@dataclass(frozen=True)
class Objective(metaclass=_ByName):
    """What every objective answers. Subclasses fix `name` (the config value) and `prediction` (what the UNet
    predicts, as the samplers in tasks/sample name it)."""

    name: ClassVar[str] = ""
    prediction: ClassVar[str] = ""
    shift: float = 2.0
    sampling: str = "logit_normal"  # uniform | logit_normal
    logit_mean: float = 0.0
    logit_std: float = 1.0
    weighting: str = "none"  # none | cosmap

    @classmethod
    def from_config(cls, cfg) -> "Objective":
        """The objective a train config names (train.objective), with its timestep settings."""
        return objective_named(cfg.objective)(cfg.shift, cfg.timestep_sampling, cfg.logit_mean, cfg.logit_std,
                                              cfg.timestep_weighting)

    @property
    def kind(self) -> str:
        return self.name

    def draw(self, generator: torch.Generator) -> tuple[float, int]:
        """One sample's noise level from its own generator: (σ, t) — the one this objective does not use is 0."""
        raise NotImplementedError

    def levels(self, sigma: list[float], t: list[int]) -> NoiseLevels:
        raise NotImplementedError

    def fixed_levels(self, grid: list[float], n: int) -> NoiseLevels:
        """The validation grid (σ in [0, 1]), repeated for n samples each."""
        raise NotImplementedError

    def inputs(self, x0: torch.Tensor, noise: torch.Tensor, levels: NoiseLevels
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, unet timestep, target, per-sample timestep weight) — all on x0's device."""
        raise NotImplementedError

    def sample(self, model, noise: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, *, steps: int,
               shift: float, cfg_scale: float) -> torch.Tensor:
        """The training sample grids' Euler sampler (the full sampler library is tasks/sample)."""
        raise NotImplementedError

    def metadata(self, recommended_shift: float) -> dict[str, str]:
        """What an exported checkpoint's header says about the objective (for people and tools)."""
        raise NotImplementedError

    def scheduler_config(self, shift: float) -> dict[str, Any] | None:
        """The diffusers scheduler config an exported folder ships (None: the SD1.5 default)."""
        return None

    def usage(self, shift: float) -> str:
        """How to sample an exported checkpoint, in one line for the train report."""
        return "sample it as any SD1.5 ε-prediction model"


@dataclass(frozen=True)
class Flow(Objective):
    name: ClassVar[str] = "flow"
    prediction: ClassVar[str] = "flow"

    def draw(self, generator: torch.Generator) -> tuple[float, int]:
        u = torch.rand(1, generator=generator, dtype=torch.float64)
        n = torch.randn(1, generator=generator, dtype=torch.float64)
        sigma = sigma_from_uniform(u, self.sampling, self.logit_mean, self.logit_std, n)
        return float(shift_sigma(sigma, self.shift)), 0

    def levels(self, sigma: list[float], t: list[int]) -> NoiseLevels:
        return NoiseLevels(sigma=torch.tensor(sigma, dtype=torch.float32))

    def fixed_levels(self, grid: list[float], n: int) -> NoiseLevels:
        return NoiseLevels(sigma=torch.tensor([s for s in grid for _ in range(n)], dtype=torch.float32))

    def inputs(self, x0, noise, levels):
        sigma = levels.sigma.to(device=x0.device, dtype=torch.float32)
        x_t = flow_noisy(x0, noise, sigma)
        weight = cosmap_weight(sigma) if self.weighting == "cosmap" else torch.ones_like(sigma)
        return x_t, flow_timestep(sigma), flow_target(x0, noise), weight

    def sample(self, model, noise, cond, uncond, *, steps, shift, cfg_scale):
        from tasks.train.sampling import sample_flow

        return sample_flow(model, noise, cond, uncond, steps=steps, shift=shift, cfg_scale=cfg_scale)

    def metadata(self, recommended_shift: float) -> dict[str, str]:
        return {
            "booruflow.prediction": "flow: v = noise - x0, timestep = sigma*1000",
            "modelspec.prediction_type": "rectified-flow",
            "booruflow.recommended_shift": f"{recommended_shift:g}",
            "booruflow.usage": (f"ComfyUI: ModelSamplingSD3 shift {recommended_shift:g}; reForge: Advanced Model "
                                f"Sampling SD3; diffusers: FlowMatchEulerDiscreteScheduler(shift={recommended_shift:g})"),
        }

    def scheduler_config(self, shift: float) -> dict[str, Any] | None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        config = dict(FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift).config)
        config["_class_name"] = "FlowMatchEulerDiscreteScheduler"
        return config

    def usage(self, shift: float) -> str:
        return (f"sample it with flow sampling, shift {shift:g}: ComfyUI ModelSamplingSD3, reForge Advanced Model "
                "Sampling (SD3), diffusers FlowMatchEulerDiscreteScheduler")


@dataclass(frozen=True)
class Epsilon(Objective):
    """SD1.5's own objective (the A/B baseline)."""

    name: ClassVar[str] = "ddpm"
    prediction: ClassVar[str] = "epsilon"

    def draw(self, generator: torch.Generator) -> tuple[float, int]:
        return 0.0, int(torch.randint(0, NUM_TRAIN_TIMESTEPS, (1,), generator=generator))

    def levels(self, sigma: list[float], t: list[int]) -> NoiseLevels:
        return NoiseLevels(t=torch.tensor(t, dtype=torch.long))

    def fixed_levels(self, grid: list[float], n: int) -> NoiseLevels:
        t = [int(round(s * (NUM_TRAIN_TIMESTEPS - 1))) for s in grid for _ in range(n)]  # t = round(σ·999)
        return NoiseLevels(t=torch.tensor(t, dtype=torch.long))

    def inputs(self, x0, noise, levels):
        t = levels.t.to(x0.device)
        x_t = ddpm_noisy(x0, noise, t)
        weight = torch.ones(x0.shape[0], device=x0.device, dtype=torch.float32)
        return x_t, t, noise, weight

    def sample(self, model, noise, cond, uncond, *, steps, shift, cfg_scale):
        from tasks.train.sampling import sample_ddpm

        return sample_ddpm(model, noise, cond, uncond, steps=steps, cfg_scale=cfg_scale)

    def metadata(self, recommended_shift: float) -> dict[str, str]:
        return {"booruflow.prediction": "epsilon (SD1.5 scaled-linear DDPM)", "modelspec.prediction_type": "epsilon"}


OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (Flow, Epsilon)}
ALIASES = {"epsilon": "ddpm"}  # what exported headers and older tools also call the DDPM objective


def objective_named(name: str) -> type[Objective]:
    """The objective class of a config value or header value (`flow`, `ddpm`, `epsilon`)."""
    try:
        return OBJECTIVES[ALIASES.get(name, name)]
    except KeyError:
        raise ConfigError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}") from None


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss = mean over the batch of weight_i · mean_pixels((pred_i − target_i)²), in fp32.

    The weight is tag_weight × timestep weight (× 0 for held-out samples). Returns (loss, per-sample mse).
    """
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    return (per_sample * weight.float()).mean(), per_sample.detach()
