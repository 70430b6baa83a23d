"""Full-size SD1.5 models with random weights, from the shipped configs, for GPU benchmarks.

No checkpoint is read or downloaded: the shapes come from ``tasks/models/configs/sd15``. Parameters
are created directly on ``device`` (no 3.4 GB CPU detour) and initialised with the classes' own
initialisation, seeded.

    python bench/sd15_shapes.py            # prints parameter counts and the device used
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.models.configs import SD15_CONFIG_DIR  # noqa: E402

# Public figures for the SD1.5 components; a mismatch means the shipped configs are wrong.
EXPECTED_PARAMS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}


def _build(factory, dtype: torch.dtype, device: str | torch.device, seed: int):
    torch.manual_seed(seed)
    with torch.device(device):
        model = factory()
    return model.to(dtype=dtype).eval()


def build_random_sd15_unet(dtype: torch.dtype = torch.float32, device: str | torch.device = "cuda",
                           seed: int = 0):
    """SD1.5 UNet2DConditionModel (859.5M params) with random weights, in ``dtype`` on ``device``."""
    from diffusers import UNet2DConditionModel

    cfg = UNet2DConditionModel.load_config(str(SD15_CONFIG_DIR / "unet"))
    return _build(lambda: UNet2DConditionModel.from_config(cfg), dtype, device, seed)


def build_random_sd15_vae(dtype: torch.dtype = torch.float32, device: str | torch.device = "cuda",
                          seed: int = 0):
    """SD1.5 AutoencoderKL (83.7M params, scaling_factor 0.18215) with random weights."""
    from diffusers import AutoencoderKL

    cfg = AutoencoderKL.load_config(str(SD15_CONFIG_DIR / "vae"))
    return _build(lambda: AutoencoderKL.from_config(cfg), dtype, device, seed)


def build_random_sd15_text_encoder(dtype: torch.dtype = torch.float32, device: str | torch.device = "cuda",
                                   seed: int = 0):
    """CLIP ViT-L/14 text encoder (123.1M params) as SD1.5 uses it, random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig.from_pretrained(str(SD15_CONFIG_DIR / "text_encoder"))
    return _build(lambda: CLIPTextModel(cfg), dtype, device, seed)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    for comp, fn in (("unet", build_random_sd15_unet), ("vae", build_random_sd15_vae),
                     ("text_encoder", build_random_sd15_text_encoder)):
        m = fn(torch.float32, dev)
        n = count_params(m)
        ok = "ok" if n == EXPECTED_PARAMS[comp] else f"MISMATCH (expected {EXPECTED_PARAMS[comp]})"
        print(f"{comp:13s} {n:>12,d} params on {name}: {ok}")
        del m
