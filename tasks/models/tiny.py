"""``builtin:tiny-sd15``: a tiny SD1.5 stand-in for CPU demos and tests (random UNet and text encoder,
a hand-set codec VAE so latents and decoded images mean something).

Same classes as the real model (UNet2DConditionModel with cross-attention, AutoencoderKL with the 8x
downsampling kept, CLIPTextModel with the real 49408-token vocabulary and 3 layers so CLIP skip 2 is
meaningful), written as a single-file LDM checkpoint plus its own diffusers config folder, and then
loaded through exactly the same code as a real checkpoint.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from tasks.models.configs import SD15_CONFIG_DIR
from tasks.models.single_file import export_single_file

TINY_NAME = "tiny-sd15"
# Bump when the tiny architecture or init changes: cached builds of another version are rebuilt.
TINY_VERSION = 2  # 2: the VAE is the hand-set codec of tasks/models/tiny_vae.py
WEIGHTS_NAME = "model.safetensors"
CONFIG_SUBDIR = "config"

TINY_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 4,
    "block_out_channels": [32, 64, 64],
    "center_input_sample": False,
    "cross_attention_dim": 64,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 1,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 16,
    "out_channels": 4,
    "sample_size": 32,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

TINY_VAE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    # Four levels = three downsamplers = the real 8x latent stride.
    "block_out_channels": [16, 32, 32, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 4,  # the codec needs >= 3 channels per norm group (tiny_vae.py)
    "sample_size": 256,
    # The codec's latents are 8x8 block means of pixels in [-1, 1] (std ~0.5): scale them to ~unit std.
    "scaling_factor": 2.0,
}

TINY_TEXT_CONFIG: dict[str, Any] = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
    "hidden_act": "quick_gelu",
    "hidden_size": 64,
    "intermediate_size": 128,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 4,
    "num_hidden_layers": 3,
    "projection_dim": 64,
    "vocab_size": 49408,
}


# The "small" scale (`fm models random --scale small`, the ab-study preset): SD1.5's own UNet and CLIP-text layouts
# (4 levels, CrossAttn x3 + plain, 2 layers a block, 8 heads; CLIP skip 2 meaningful) at reduced width, and the tiny
# codec VAE (an 8x AutoencoderKL whose latents are block means: cheap, and samples that can be judged by eye).
# UNet width 2/5 of SD1.5's (128..512 channels): ~1/6 of its parameters and FLOPs at a latent size; text encoder
# 512 wide, 6 layers (the real vocabulary and tokenizer). Sizes chosen for tasks/study: see
# pipeline_config/presets/ab-study.yaml.
SMALL_UNET_OVERRIDES: dict[str, Any] = {"block_out_channels": [128, 256, 512, 512], "cross_attention_dim": 512,
                                        "sample_size": 32}
SMALL_TEXT_OVERRIDES: dict[str, Any] = {"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8,
                                        "num_hidden_layers": 6, "projection_dim": 512}
_SHIPPED_ONLY = ("_diffusers_version", "_name_or_path", "torch_dtype", "transformers_version")


def small_configs() -> dict[str, dict[str, Any]]:
    """The small scale's configs: the shipped SD1.5 UNet and text encoder at reduced width + the tiny VAE."""
    def shipped(component: str, overrides: dict[str, Any]) -> dict[str, Any]:
        cfg = json.loads((SD15_CONFIG_DIR / component / "config.json").read_text())
        return {**{k: v for k, v in cfg.items() if k not in _SHIPPED_ONLY}, **copy.deepcopy(overrides)}

    return {"unet": shipped("unet", SMALL_UNET_OVERRIDES), "vae": copy.deepcopy(TINY_VAE_CONFIG),
            "text_encoder": shipped("text_encoder", SMALL_TEXT_OVERRIDES)}


def tiny_configs(**overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The tiny configs, with per-component overrides (``unet={...}``) for tests of other shapes."""
    cfgs = {"unet": copy.deepcopy(TINY_UNET_CONFIG), "vae": copy.deepcopy(TINY_VAE_CONFIG),
            "text_encoder": copy.deepcopy(TINY_TEXT_CONFIG)}
    for name, upd in overrides.items():
        cfgs[name].update(upd)
    return cfgs


def build_tiny_models(seed: int, configs: dict[str, dict[str, Any]] | None = None, codec_vae: bool | None = None):
    """Randomly initialised (unet, vae, text_encoder), deterministic for a given seed (fp32, CPU). codec_vae: set
    the VAE to the hand-set codec (tiny_vae.py; needs the tiny VAE config); None = only for the builtin."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfgs = configs or tiny_configs()
    codec = configs is None if codec_vae is None else codec_vae
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(cfgs["unet"])
        vae = AutoencoderKL.from_config(cfgs["vae"])
        if codec:  # a VAE that really encodes and decodes (tiny_vae.py)
            from tasks.models.tiny_vae import set_codec_weights

            set_codec_weights(vae)
        te_cfg = {k: v for k, v in cfgs["text_encoder"].items() if k not in ("architectures", "model_type")}
        text_encoder = CLIPTextModel(CLIPTextConfig(**te_cfg))
    return unet.eval(), vae.eval(), text_encoder.eval()


def write_config_folder(folder: Path, unet: Any, vae: Any, text_encoder: Any) -> None:
    """A diffusers-layout config folder (no weights) describing these three models."""
    from tasks.models.single_file import config_dict

    for sub, model in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / sub / "config.json").write_text(json.dumps(config_dict(model), indent=2, sort_keys=True))
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SD15_CONFIG_DIR / "scheduler" / "scheduler_config.json",
                    folder / "scheduler" / "scheduler_config.json")
    shutil.copyfile(SD15_CONFIG_DIR / "model_index.json", folder / "model_index.json")


def tiny_dir(cache_dir: Path, seed: int) -> Path:
    return Path(cache_dir) / "models" / f"{TINY_NAME}-{seed}"


def _is_complete(folder: Path) -> bool:
    try:
        build = json.loads((folder / "build.json").read_text())
    except (OSError, ValueError):
        return False
    return (build.get("version") == TINY_VERSION and (folder / WEIGHTS_NAME).is_file()
            and (folder / CONFIG_SUBDIR / "unet" / "config.json").is_file())


def ensure_tiny_sd15(cache_dir: Path, seed: int = 0) -> Path:
    """Build ``<cache_dir>/models/tiny-sd15-<seed>/`` on first use (atomic: temp folder + rename).

    Holds ``model.safetensors`` (fp32 single-file LDM layout), ``config/`` (diffusers configs) and
    ``build.json`` (written last). Returns the folder.
    """
    final = tiny_dir(cache_dir, seed)
    if _is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        unet, vae, text_encoder = build_tiny_models(seed)
        write_config_folder(tmp / CONFIG_SUBDIR, unet, vae, text_encoder)
        # fp32 so loading it back is exact; no time-varying metadata so builds are byte-identical.
        export_single_file(unet, vae, text_encoder, tmp / WEIGHTS_NAME, dtype=torch.float32,
                           metadata={"booruflow.builtin": TINY_NAME, "booruflow.seed": str(seed),
                                     "booruflow.tiny_version": str(TINY_VERSION)})
        (tmp / "build.json").write_text(json.dumps({"name": TINY_NAME, "seed": seed, "version": TINY_VERSION}))
        if _is_complete(final):  # another process finished first: use its build, drop ours
            return final
        if final.exists():  # stale version, or a folder left by an older layout
            stale = final.with_name(f".{final.name}.stale-{os.getpid()}")
            os.rename(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_complete(final):  # a concurrent builder won the race; otherwise a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
