"""Samplers for the rectified-flow parameterisation.

The model predicts the velocity v = ε − x0 of x_σ = (1 − σ)·x0 + σ·ε; a sampler gets it through
``velocity_fn(x, sigma) -> v̂`` (CFG already applied) and works with the denoised estimate
x̂0 = x − σ·v̂ where that is the natural form. Sigmas run from 1 (noise) down to 0.

* ``euler``            x ← x + (σ_next − σ)·v̂. Identical to diffusers FlowMatchEulerDiscreteScheduler.step
                       and to ComfyUI ``euler`` with ModelSamplingSD3 (CONST).
* ``euler_ancestral``  ComfyUI's ``sample_euler_ancestral_RF``: step down to σ_down = σ_next·(1 + (σ_next/σ − 1)·η)
                       along the ODE, rescale by α_next/α_down and add fresh noise so that the marginal is
                       again (1 − σ_next)·x0 + σ_next·ε. η = 1 by default, η = 0 is plain Euler.
* ``dpmpp_2m``         DPM-Solver++(2M), data prediction, in the flow half-logSNR λ = log((1 − σ)/σ)
                       (α = 1 − σ). Same update as diffusers DPMSolverMultistepScheduler with
                       ``use_flow_sigmas=True, prediction_type="flow_prediction"`` (midpoint, 2nd order) and
                       ComfyUI ``dpmpp_2m_sde`` at η = 0. (ComfyUI's own ``dpmpp_2m`` uses λ = −log σ for every
                       model type; for a flow model that is a different second-order correction.)
* ``dpmpp_sde``        DPM-Solver++ (stochastic, 2 stages, r = ½) in the flow λ, as ComfyUI's ``dpmpp_sde``
                       does for CONST models. Difference: ComfyUI draws its noise from a Brownian tree
                       (torchsde); here every stage draws fresh Gaussian noise from the per-image generator.
                       The marginals are the same, the draws for a given seed are not.

Stochastic samplers take one ``torch.Generator`` per batch row so an image depends only on its own seed,
never on what it was batched with. The last step (σ_next = 0) of every sampler returns x̂0.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from data_contracts.errors import ConfigError

VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]
StepCallback = Callable[[int, float, torch.Tensor], None]  # (step index, sigma, denoised)

SAMPLER_LABELS = {  # our name -> the A1111/ComfyUI-style name written into PNG parameters
    "euler": "Euler",
    "euler_ancestral": "Euler a",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_sde": "DPM++ SDE",
}
SAMPLERS: tuple[str, ...] = tuple(SAMPLER_LABELS)
# DPM++ SDE needs a finite λ at the first sigma; ComfyUI moves σ=1 to percent_to_sigma(1e-4) likewise.
_FIRST_SIGMA_OFFSET = 1e-4


class NoiseSource:
    """Standard normal noise shaped like a batch, row i drawn from generators[i] (None = global RNG)."""

    def __init__(self, generators: Sequence[torch.Generator | None] | None):
        self.generators = list(generators) if generators is not None else None

    def like(self, x: torch.Tensor) -> torch.Tensor:
        if not self.generators:
            return torch.randn(x.shape, dtype=x.dtype, device=x.device)
        if len(self.generators) != x.shape[0]:
            raise ValueError(f"{len(self.generators)} generators for a batch of {x.shape[0]}")
        rows = [torch.randn((1, *x.shape[1:]), generator=g, dtype=torch.float32,
                            device=g.device if g is not None else x.device) for g in self.generators]
        return torch.cat(rows).to(device=x.device, dtype=x.dtype)


def _half_log_snr(sigma: float) -> float:
    """λ = log(α/σ) with α = 1 − σ; −inf at σ = 1, +inf at σ = 0."""
    if sigma >= 1.0:
        return -math.inf
    if sigma <= 0.0:
        return math.inf
    return math.log((1.0 - sigma) / sigma)


def _sigma_from_half_log_snr(lam: float) -> float:
    return 1.0 / (1.0 + math.exp(lam))


def _floats(sigmas: torch.Tensor | Sequence[float]) -> list[float]:
    return [float(s) for s in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]


def _denoised(x: torch.Tensor, sigma: float, v: torch.Tensor) -> torch.Tensor:
    return x - sigma * v


def sample_euler(velocity_fn: VelocityFn, x: torch.Tensor, sigmas, *, callback: StepCallback | None = None,
                 **_: object) -> torch.Tensor:
    sig_t = torch.as_tensor(sigmas)
    if not sig_t.is_floating_point():
        sig_t = sig_t.to(torch.float32)
    for i in range(len(sig_t) - 1):
        s = float(sig_t[i])
        v = velocity_fn(x, s)
        if callback is not None:
            callback(i, s, _denoised(x, s, v))
        # Same arithmetic as diffusers: sample upcast to (at least) float32, dt from the sigma table.
        dt = sig_t[i + 1] - sig_t[i]
        x = (x.to(torch.promote_types(x.dtype, torch.float32)) + dt * v).to(v.dtype)
    return x


def sample_euler_ancestral(velocity_fn: VelocityFn, x: torch.Tensor, sigmas, *, noise: NoiseSource,
                           eta: float = 1.0, s_noise: float = 1.0, callback: StepCallback | None = None,
                           **_: object) -> torch.Tensor:
    sig = _floats(sigmas)
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        den = _denoised(x, s, velocity_fn(x, s))
        if callback is not None:
            callback(i, s, den)
        if s_next == 0.0:
            x = den
            continue
        sigma_down = s_next * (1.0 + (s_next / s - 1.0) * eta)
        alpha_next, alpha_down = 1.0 - s_next, 1.0 - sigma_down
        ratio = sigma_down / s
        x = ratio * x + (1.0 - ratio) * den  # ODE (Euler) step down to sigma_down
        if eta > 0:
            renoise = math.sqrt(max(0.0, s_next ** 2 - sigma_down ** 2 * alpha_next ** 2 / alpha_down ** 2))
            x = (alpha_next / alpha_down) * x + noise.like(x) * (s_noise * renoise)
    return x


def sample_dpmpp_2m(velocity_fn: VelocityFn, x: torch.Tensor, sigmas, *, callback: StepCallback | None = None,
                    **_: object) -> torch.Tensor:
    sig = _floats(sigmas)
    old_den: torch.Tensor | None = None
    h_last = math.inf
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        den = _denoised(x, s, velocity_fn(x, s))
        if callback is not None:
            callback(i, s, den)
        if s_next == 0.0:
            x = den
            break
        lam_s, lam_t = _half_log_snr(s), _half_log_snr(s_next)
        h = lam_t - lam_s
        alpha_t = 1.0 - s_next
        # α_t·(1 − e^{−h}) with e^{−h} = (σ_t/α_t)·(α_s/σ_s); stays finite when σ_s = 1 (α_s = 0).
        exp_neg_h = (s_next / alpha_t) * ((1.0 - s) / s)
        c = alpha_t * (1.0 - exp_neg_h)
        x = (s_next / s) * x + c * den
        if old_den is not None and math.isfinite(h_last):
            r = h_last / h
            x = x + (0.5 * c / r) * (den - old_den)
        old_den, h_last = den, h
    return x


def _ancestral_step_ve(sigma_from: float, sigma_to: float, eta: float) -> tuple[float, float]:
    """k-diffusion get_ancestral_step on VE sigmas (here σ/α): (sigma_down, sigma_up)."""
    if not eta:
        return sigma_to, 0.0
    up = min(sigma_to, eta * math.sqrt(max(0.0, sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2)))
    return math.sqrt(max(0.0, sigma_to ** 2 - up ** 2)), up


def sample_dpmpp_sde(velocity_fn: VelocityFn, x: torch.Tensor, sigmas, *, noise: NoiseSource, eta: float = 1.0,
                     s_noise: float = 1.0, r: float = 0.5, callback: StepCallback | None = None,
                     **_: object) -> torch.Tensor:
    sig = _floats(sigmas)
    if sig and sig[0] >= 1.0:
        sig[0] = 1.0 - _FIRST_SIGMA_OFFSET
    fac = 1.0 / (2.0 * r)
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        den = _denoised(x, s, velocity_fn(x, s))
        if callback is not None:
            callback(i, s, den)
        if s_next == 0.0:
            x = den
            break
        lam_s, lam_t = _half_log_snr(s), _half_log_snr(s_next)
        h = lam_t - lam_s
        lam_s1 = lam_s + r * h
        s1 = _sigma_from_half_log_snr(lam_s1)
        alpha_s, alpha_s1, alpha_t = 1.0 - s, 1.0 - s1, 1.0 - s_next
        # Stage 1: ancestral DPM-Solver++ step to the intermediate λ_s1.
        sd, su = _ancestral_step_ve(math.exp(-lam_s), math.exp(-lam_s1), eta)
        h_ = -math.log(sd) - lam_s
        x2 = (alpha_s1 / alpha_s) * math.exp(-h_) * x - alpha_s1 * math.expm1(-h_) * den
        if eta > 0 and s_noise > 0:
            x2 = x2 + noise.like(x) * (alpha_s1 * s_noise * su)
        den2 = _denoised(x2, s1, velocity_fn(x2, s1))
        # Stage 2: full step with the combined denoised estimate.
        sd, su = _ancestral_step_ve(math.exp(-lam_s), math.exp(-lam_t), eta)
        h_ = -math.log(sd) - lam_s
        den_d = (1.0 - fac) * den + fac * den2
        x = (alpha_t / alpha_s) * math.exp(-h_) * x - alpha_t * math.expm1(-h_) * den_d
        if eta > 0 and s_noise > 0:
            x = x + noise.like(x) * (alpha_t * s_noise * su)
    return x


_FUNCS = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_sde": sample_dpmpp_sde,
}


def check_sampler(name: str) -> str:
    if name not in _FUNCS:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return name


def model_calls(name: str, steps: int) -> int:
    """UNet evaluations (per CFG pair) a sampler spends on ``steps`` steps (DPM++ SDE: two per step but the last)."""
    check_sampler(name)
    return 2 * steps - 1 if name == "dpmpp_sde" else steps


def sample(name: str, velocity_fn: VelocityFn, x: torch.Tensor, sigmas, *,
           generators: Sequence[torch.Generator | None] | None = None, eta: float = 1.0,
           callback: StepCallback | None = None) -> torch.Tensor:
    """Run sampler ``name`` from x (already at sigmas[0]) down to sigmas[-1]; returns the final latents."""
    fn = _FUNCS[check_sampler(name)]
    return fn(velocity_fn, x, sigmas, noise=NoiseSource(generators), eta=eta, callback=callback)
