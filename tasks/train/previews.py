"""Mid-training looks at the live models: the held-out validation loss and the sample grid.

Both run the plain UNet module eagerly (`.forward`: sampling and validation shapes never trigger
torch.compile) in eval mode, and put it back into train mode after.
"""
from __future__ import annotations

from pathlib import Path

import torch

from tasks.train.engine import encode_prompts
from tasks.train.parts import TrainParts


class Denoiser:
    """`denoise(x_t, t, context)` and `encode(ids)` as the sampler and the validation loss call them."""

    def __init__(self, p: TrainParts) -> None:
        self.unet, self.te = p.models.unet_module, p.models.te_module
        self.device, self.clip_skip, self.channels_last = p.acc.device, p.cfg.clip_skip, p.cfg.channels_last

    def denoise(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.unet.forward(x, t, encoder_hidden_states=ctx, return_dict=False)[0]

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        return encode_prompts(self.te, self.te, ids.to(self.device), self.clip_skip)


def validation(p: TrainParts) -> dict[str, float]:
    """The loss on rank 0's held-out samples (`p.heldout`), overall and per σ of the grid."""
    from tasks.train.validation import validation_loss

    v, net = p.cfg.validation, Denoiser(p)
    net.unet.eval()
    try:
        return validation_loss(p.heldout, denoise=net.denoise, encode=net.encode, objective=p.objective,
                               sigmas=v.sigmas, scaling_factor=p.manifest.scaling_factor,
                               max_chunks=p.cfg.max_chunks, batch_size=v.batch_size, device=p.acc.device,
                               autocast=p.acc.autocast)
    finally:
        net.unet.train()


@torch.no_grad()
def sample_grid(p: TrainParts, step: int) -> str | None:
    """Rank 0 renders the grid (rows: prompts, columns: seeds) and returns its path in the work folder;
    other ranks wait for it and return None."""
    path = None
    if p.acc.is_main_process:
        path = f"samples/step-{step:08d}.png"
        _render(p, p.work / path)
    p.acc.wait_for_everyone()
    return path


def _render(p: TrainParts, out: Path) -> None:
    import numpy as np

    from tasks.models.text_encode import pack_batch, pad_chunks
    from tasks.models.tokenizer import tokenize_text
    from tasks.models.vae import decode_latents
    from tasks.train.sampling import save_grid, seeded_noise, to_uint8

    s, tok, net = p.cfg.sampling, p.models.tokenizer, Denoiser(p)
    net.unet.eval()
    images = []
    try:
        uncond_ids = pack_batch([tokenize_text(tok, s.negative_prompt)] * len(s.seeds), p.cfg.max_chunks)
        for prompt in s.prompts:
            cond_ids = pack_batch([tokenize_text(tok, prompt)] * len(s.seeds), p.cfg.max_chunks)
            c_ids, u_ids = pad_chunks(cond_ids, uncond_ids)
            with p.acc.autocast():
                cond, uncond = net.encode(c_ids), net.encode(u_ids)
                noise = seeded_noise(s.seeds, (4, s.height // 8, s.width // 8)).to(p.acc.device)
                lat = p.objective.sample(net.denoise, noise, cond, uncond, steps=s.steps, shift=s.shift,
                                         cfg_scale=s.cfg_scale)
            # The VAE decodes in its own dtype (fp32), outside autocast: SD VAEs are prone to overflow in
            # half precision, and it is a few images.
            images.append(to_uint8(decode_latents(p.models.vae, lat)))
    finally:
        net.unet.train()
    save_grid(np.concatenate(images), out, cols=len(s.seeds), prompts=s.prompts, seeds=s.seeds)
