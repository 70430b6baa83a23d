"""VAE helpers with one convention for every stage.

Pixels are NCHW in [-1, 1]. ``encode_latent_dist`` returns the *unscaled* posterior (mean, std) — what
the cache stores; the model-space latent is ``(mean + std·ε) · scaling_factor`` (see
:func:`sample_latents`). ``decode_latents`` takes model-space (scaled) latents.
"""
from __future__ import annotations

import torch

SD15_SCALING_FACTOR = 0.18215


def vae_scaling_factor(vae: torch.nn.Module) -> float:
    sf = getattr(vae.config, "scaling_factor", None)
    return float(sf) if sf is not None else SD15_SCALING_FACTOR


def vae_shift_factor(vae: torch.nn.Module) -> float:
    sh = getattr(vae.config, "shift_factor", None)
    return float(sh) if sh is not None else 0.0  # SD1.5 has none


def _vae_dtype_device(vae: torch.nn.Module) -> tuple[torch.dtype, torch.device]:
    p = next(vae.parameters())
    return p.dtype, p.device


def encode_latent_dist(vae: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels [-1,1] (N,3,H,W) -> posterior (mean, std), each (N,C,H/8,W/8), unscaled, in the VAE dtype."""
    dtype, device = _vae_dtype_device(vae)
    dist = vae.encode(pixels.to(device=device, dtype=dtype)).latent_dist
    return dist.mean, dist.std


def sample_latents(mean: torch.Tensor, std: torch.Tensor | None, scaling_factor: float,
                   generator: torch.Generator | None = None, shift_factor: float = 0.0) -> torch.Tensor:
    """Model-space latent from a cached posterior: ``(mean + std·ε − shift) · scale`` (std None → mean)."""
    x = mean
    if std is not None:
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        x = mean + std * eps
    return (x - shift_factor) * scaling_factor


def decode_latents(vae: torch.nn.Module, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """Model-space latents -> pixels in [-1, 1] (clamped unless ``clamp=False``), in the VAE dtype."""
    dtype, device = _vae_dtype_device(vae)
    z = latents.to(device=device, dtype=dtype) / vae_scaling_factor(vae) + vae_shift_factor(vae)
    pixels = vae.decode(z).sample
    return pixels.clamp(-1.0, 1.0) if clamp else pixels
