"""The study's model file: built on first use when the config asks for a random one, and its size for the report."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from data_contracts.errors import ConfigError
from pipeline_config.schema import PipelineConfig

UNET_PREFIX = "model.diffusion_model."
TEXT_PREFIX = "cond_stage_model."


def ensure_random_model(cfg: PipelineConfig, say: Callable[[str], None] = print) -> Path | None:
    """With `study.random_model` set, write `fm models random --scale <it> --only sd15` to train.model when that
    file is missing and has the name the command gives it; a file that exists (a real checkpoint) is never
    touched, and any other missing path is left to the stages' own message. The written path, else None."""
    scale = cfg.study.random_model
    if not scale:
        return None
    from tasks.models.random_models import (
        codec_vae,
        output_name,
        sd15_configs,
        write_random_sd15,
    )

    path = Path(cfg.train.model).expanduser()
    if path.exists() or cfg.train.model.startswith("builtin:"):
        return None
    if path.name != output_name("sd15", scale):
        raise ConfigError(f"study.random_model={scale}: train.model {path} does not exist and is not named "
                          f"{output_name('sd15', scale)}, the file it would build; point train.model at an existing "
                          f"checkpoint or at <folder>/{output_name('sd15', scale)}")
    say(f"study: building the random {scale} SD1.5 at {path} (fm models random --scale {scale} --only sd15)")
    path.parent.mkdir(parents=True, exist_ok=True)
    configs = sd15_configs(scale)
    write_random_sd15(path.parent, seed=cfg.seed, configs=configs, name=path.name, codec=codec_vae(scale),
                      dtype="fp32" if scale == "tiny" else "fp16", log=say)
    return path


def codec_model(cfg: PipelineConfig) -> bool:
    """Whether train.model is the random model `study.random_model` builds with the hand-set codec VAE (exact in
    fp32 only; the cache stage encodes in bf16 on a GPU). A real checkpoint (any other file name) is not."""
    from tasks.models.random_models import codec_vae, output_name

    scale = cfg.study.random_model
    return bool(scale) and codec_vae(scale) and Path(cfg.train.model).name == output_name("sd15", scale)


def param_counts(checkpoint: str | Path) -> tuple[float | None, float | None]:
    """(UNet, text encoder) parameters in millions, from a single file's header (nothing is loaded)."""
    try:
        from safetensors import safe_open

        unet = text = 0
        with safe_open(str(checkpoint), framework="pt") as f:
            for key in f.keys():
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= int(d)
                if key.startswith(UNET_PREFIX):
                    unet += n
                elif key.startswith(TEXT_PREFIX):
                    text += n
        return (unet / 1e6 or None, text / 1e6 or None)
    except Exception:  # not a single file (a diffusers folder): the report leaves the sizes out
        return None, None


def config_param_counts(scale: str) -> tuple[float, float]:
    """(UNet, text encoder) parameters in millions of `fm models random --scale <scale>`, built on the meta
    device (no memory, no weights)."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tasks.models.random_models import sd15_configs

    cfgs = sd15_configs(scale)  # type: ignore[arg-type]
    te_cfg = {k: v for k, v in cfgs["text_encoder"].items() if k not in ("architectures", "model_type")}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfgs["unet"])
        text = CLIPTextModel(CLIPTextConfig(**te_cfg))
    return (sum(p.numel() for p in unet.parameters()) / 1e6, sum(p.numel() for p in text.parameters()) / 1e6)
