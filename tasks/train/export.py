"""Export the fine-tuned model: a single-file SD1.5 checkpoint and a diffusers folder.

A single file carries no key that makes ComfyUI / Forge / diffusers pick flow sampling, so the objective and
the recommended inference shift go into the safetensors metadata for people and tools to read
(ComfyUI: ModelSamplingSD3 with that shift; diffusers: FlowMatchEulerDiscreteScheduler(shift=...)). The
diffusers folder ships that scheduler config, so `StableDiffusionPipeline.from_pretrained` samples with
flow out of the box (set `pipe.scheduler.init_noise_sigma = 1.0` on diffusers versions that need it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tasks.models.load import SD15Components, save_diffusers_folder
from tasks.models.single_file import export_single_file

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def checkpoint_metadata(objective: str, recommended_shift: float, *, base_identity: str, train_shift: float,
                        steps: int, extra: dict[str, Any] | None = None) -> dict[str, str]:
    meta = {
        "booruflow.objective": objective,
        "booruflow.prediction": "flow: v = noise - x0, timestep = sigma*1000" if objective == "flow"
        else "epsilon (SD1.5 scaled-linear DDPM)",
        "booruflow.train_shift": f"{train_shift:g}",
        "booruflow.base_model": base_identity,
        "booruflow.steps": str(steps),
        "modelspec.architecture": "stable-diffusion-v1",
        "modelspec.prediction_type": "rectified-flow" if objective == "flow" else "epsilon",
    }
    if objective == "flow":
        meta["booruflow.recommended_shift"] = f"{recommended_shift:g}"
        meta["booruflow.usage"] = (f"ComfyUI: ModelSamplingSD3 shift {recommended_shift:g}; reForge: Advanced Model "
                                   f"Sampling SD3; diffusers: FlowMatchEulerDiscreteScheduler(shift={recommended_shift:g})")
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    return meta


def flow_scheduler_config(shift: float) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = dict(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift).config)
    config["_class_name"] = "FlowMatchEulerDiscreteScheduler"
    return config


def export_model(out_dir: Path, *, unet, vae, text_encoder, tokenizer, objective: str, dtype: str,
                 recommended_shift: float, metadata: dict[str, str], diffusers: bool = True,
                 filename: str = "model.safetensors") -> dict[str, str]:
    """Write `<out_dir>/<filename>` (and `<out_dir>/diffusers/`); returns their paths relative to out_dir."""
    out_dir = Path(out_dir)
    export_single_file(unet, vae, text_encoder, out_dir / filename, dtype=DTYPES[dtype], metadata=metadata)
    written = {"checkpoint": filename}
    if diffusers:
        sched = flow_scheduler_config(recommended_shift) if objective == "flow" else None
        save_diffusers_folder(SD15Components(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer),
                              out_dir / "diffusers", scheduler_config=sched)
        written["diffusers_dir"] = "diffusers"
    return written
