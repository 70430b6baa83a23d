"""The hand-set codec VAE of the builtin tiny model (tasks/models/tiny_vae.py), built standalone."""
from __future__ import annotations


def pooling_vae():
    from diffusers import AutoencoderKL

    from tasks.models.tiny import tiny_configs
    from tasks.models.tiny_vae import set_codec_weights

    vae = AutoencoderKL.from_config(tiny_configs()["vae"])
    set_codec_weights(vae)
    return vae.eval()
