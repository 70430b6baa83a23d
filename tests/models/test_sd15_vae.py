from __future__ import annotations

import torch

from tasks.models.vae import decode_latents, encode_latent_dist, sample_latents, vae_scaling_factor


def test_scaling_factor(tiny):
    assert vae_scaling_factor(tiny.vae) == 0.18215


def test_encode_dist_keeps_8x_stride(tiny):
    px = torch.rand(2, 3, 64, 96) * 2 - 1
    with torch.no_grad():
        mean, std = encode_latent_dist(tiny.vae, px)
        direct = tiny.vae.encode(px).latent_dist
    assert mean.shape == std.shape == (2, 4, 8, 12)
    assert (std > 0).all()
    torch.testing.assert_close(mean, direct.mean)
    torch.testing.assert_close(std, direct.std)


def test_sample_and_decode(tiny):
    mean, std = torch.randn(1, 4, 8, 8), torch.rand(1, 4, 8, 8)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    x = sample_latents(mean, std, 0.18215, generator=g1)
    eps = torch.randn(mean.shape, generator=g2)
    torch.testing.assert_close(x, (mean + std * eps) * 0.18215)
    torch.testing.assert_close(sample_latents(mean, None, 0.5), mean * 0.5)
    with torch.no_grad():
        px = decode_latents(tiny.vae, x)
        raw = tiny.vae.decode(x / 0.18215).sample
    assert px.shape == (1, 3, 64, 64) and px.min() >= -1 and px.max() <= 1
    torch.testing.assert_close(px, raw.clamp(-1, 1))
