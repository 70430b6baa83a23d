from __future__ import annotations

import torch

from tasks.models.vae import decode_latents, encode_latent_dist, sample_latents, vae_scaling_factor


def test_scaling_factor(tiny):
    import json

    from tasks.models.configs import SD15_CONFIG_DIR

    assert vae_scaling_factor(tiny.vae) == 2.0  # the tiny codec VAE's own (tasks/models/tiny.py)
    assert json.loads((SD15_CONFIG_DIR / "vae" / "config.json").read_text())["scaling_factor"] == 0.18215


def test_builtin_tiny_vae_reconstructs(tiny):
    """The builtin VAE is the hand-set codec: decode(encode(x)) is a blocky copy of x."""
    torch.manual_seed(0)
    blocks = torch.rand(1, 3, 4, 4) * 2 - 1
    px = torch.nn.functional.interpolate(blocks, scale_factor=8, mode="nearest")  # constant 8x8 blocks
    with torch.no_grad():
        mean, std = encode_latent_dist(tiny.vae, px)
        out = decode_latents(tiny.vae, mean * vae_scaling_factor(tiny.vae))
    assert (out - px).abs().max() < 1e-2
    assert std.max() < 1e-3


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
    sf = vae_scaling_factor(tiny.vae)
    x = sample_latents(mean, std, sf, generator=g1)
    eps = torch.randn(mean.shape, generator=g2)
    torch.testing.assert_close(x, (mean + std * eps) * sf)
    torch.testing.assert_close(sample_latents(mean, None, 0.5), mean * 0.5)
    with torch.no_grad():
        px = decode_latents(tiny.vae, x)
        raw = tiny.vae.decode(x / sf).sample
    assert px.shape == (1, 3, 64, 64) and px.min() >= -1 and px.max() <= 1
    torch.testing.assert_close(px, raw.clamp(-1, 1))
