"""Config of the train stage: the flow-matching (or DDPM) fine-tune of SD1.5 under accelerate.

Defaults are the seed recipe (nai-v2-fm-alpha): rectified flow with train shift 2, batch 12 x 14
accumulation, LR 2.5e-5 constant after a 5 % warm-up, bf16 autocast over fp32 weights, 8-bit AdamW,
5 % caption dropout, up to 3 CLIP chunks with CLIP skip 2, frozen text encoder.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline_config.base import Section, execution_field


class SamplingConfig(Section):
    """Sample grids during training: fixed prompts and seeds, Euler flow sampler."""

    every: int = 0  # optimiser steps between grids; 0 = only after the last step
    prompts: list[str] = Field(default_factory=lambda: [
        "1girl, solo, long hair, looking at viewer, smile, masterpiece, good score",
        "1boy, solo, short hair, upper body, masterpiece, good score",
    ])
    negative_prompt: str = "worst score, bad score, lowres, bad anatomy"
    seeds: list[int] = Field(default_factory=lambda: [0, 1])
    steps: int = Field(28, ge=1)
    shift: float = Field(3.0, gt=0)  # inference shift (train shift is `train.shift`)
    cfg_scale: float = Field(6.0, ge=1.0)
    width: int = Field(512, ge=64, multiple_of=64)
    height: int = Field(512, ge=64, multiple_of=64)


class ValidationConfig(Section):
    """Deterministic held-out loss: fixed samples, fixed noise, a fixed σ grid."""

    fraction: float = Field(0.02, ge=0.0, lt=0.5)  # share of sample ids held out (by id hash)
    max_samples: int = Field(256, ge=0)
    sigmas: list[float] = Field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    every: int = 0  # optimiser steps between evaluations; 0 = only after the last step
    batch_size: int = Field(8, ge=1)


class EmaConfig(Section):
    enabled: bool = False
    decay: float = Field(0.9999, gt=0.0, lt=1.0)
    every: int = Field(1, ge=1)  # optimiser steps between EMA updates
    export: bool = True  # export the EMA weights (when enabled) instead of the raw ones


class LoggingConfig(Section):
    every: int = Field(10, ge=1)  # optimiser steps between history rows / TensorBoard points
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "booruflow"


PHASE_SECTIONS = ("bucket.", "cache.", "train.")  # what a phase may change: its data, resolution and training


class PhaseConfig(Section):
    """One phase of a run in phases (`train.phases`): a name and what it changes, as dotted keys of the bucket,
    cache and train sections (data selection `bucket.select.*`, `bucket.resolution`, `train.max_steps`,
    `train.lr`, `train.batch_size`, ...). Each phase is its own bucket, cache and train output; a phase after
    the first starts from the previous phase's exported weights."""

    name: str = Field(min_length=1, max_length=40, pattern=r"^[a-z0-9][a-z0-9_-]*$")
    overrides: dict[str, Any] = Field(default_factory=dict)

    @field_validator("overrides")
    @classmethod
    def _sections(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        for key in overrides:
            if not key.startswith(PHASE_SECTIONS) or key.count(".") < 1:
                raise ValueError(f"phase override {key!r}: a phase changes keys of bucket, cache or train "
                                 f"(e.g. bucket.resolution, train.lr)")
            if key.startswith(("train.phases", "train.phase")):
                raise ValueError(f"phase override {key!r}: phases do not nest")
        return overrides


class TrainConfig(Section):
    # --- model and objective ------------------------------------------------------------------
    model: str = "builtin:tiny-sd15"  # single file, diffusers folder or builtin:tiny-sd15[?seed=N]
    objective: Literal["flow", "ddpm"] = "flow"
    shift: float = Field(2.0, gt=0)  # σ' = sσ / (1 + (s-1)σ)
    timestep_sampling: Literal["uniform", "logit_normal"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    timestep_weighting: Literal["none", "cosmap"] = "none"  # cosmap: SD3's flow weighting
    seed: int = 0

    # --- batches and schedule ---------------------------------------------------------------
    batch_size: int = Field(12, ge=1)  # per process (per GPU)
    grad_accum: int = Field(14, ge=1)
    epochs: int = Field(20, ge=1)
    max_steps: int | None = Field(None, ge=1)  # optimiser steps; caps `epochs` when set
    lr: float = Field(2.5e-5, gt=0)
    warmup: float = Field(0.05, ge=0.0, lt=1.0)  # fraction of all optimiser steps, linear from 0
    optimizer: Literal["adamw8bit", "adamw"] = "adamw8bit"
    weight_decay: float = Field(1e-2, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, ge=0.0)  # 0 = no clipping

    # --- precision and speed ----------------------------------------------------------------
    mixed_precision: Literal["bf16", "fp16", "no"] = "bf16"
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile, static shapes: one graph per bucket shape
    # default, or reduce-overhead: the compiled step replayed as CUDA graphs (no per-kernel launch cost)
    compile_mode: Literal["default", "reduce-overhead"] = "default"
    # static: the whole UNet compiled once per bucket shape (~160 s each on a fresh H100, 17 buckets at 512²);
    # regional: each ResNet / transformer block compiled alone with symbolic height/width, so one set of
    # small graphs serves every block and bucket (tasks/train/compile_cache.py). H100, 17-bucket 512² stream:
    # every bucket at speed 4.6 min after a cold start (static: one ~160 s compile per bucket, ~45 min),
    # 2.4 min with the compile cache present; the same per-step device time at 512x512 as static (119.5 vs
    # 120.2 ms, measured on two machines), 9.2 instead of 17.5 GiB allocated. auto = regional on one process,
    # static under DDP (regional + DDP not measured on GPUs yet). Execution-only (not in the stage
    # fingerprint): the same math, other kernel scheduling.
    # (A whole-UNet graph with symbolic height/width, prepare_unet's "dynamic", took > 7 min to compile.)
    compile_strategy: Literal["auto", "static", "regional"] = execution_field("auto")
    # Keep compiled graphs under runtime.cache_dir/torch-compile/<key of model, options, torch, GPU> so a
    # rerun or resume on the same kind of machine loads them instead of compiling. Execution-only.
    compile_cache: bool = execution_field(True)
    channels_last: bool = False
    attention_backend: Literal["auto", "flash", "cudnn", "efficient", "math"] = "auto"

    # --- text conditioning --------------------------------------------------------------------
    caption_dropout: float = Field(0.05, ge=0.0, le=1.0)  # empty prompt, for CFG
    tag_dropout: float = Field(0.0, ge=0.0, lt=1.0)  # per general tag
    shuffle_general: bool = True
    max_chunks: int = Field(3, ge=1, le=8)  # 75 tokens each
    clip_skip: int = Field(2, ge=1)
    train_text_encoder: bool = False
    text_encoder_lr: float = Field(5e-6, gt=0)

    # --- data loading -------------------------------------------------------------------------
    shuffle_buffer: int = Field(2048, ge=1)
    prefetch: int = Field(4, ge=1)

    # --- robustness ---------------------------------------------------------------------------
    checkpoint_every: int = Field(500, ge=1)  # optimiser steps
    keep_last: int = Field(2, ge=1)
    keep_checkpoint_in_output: bool = False  # the resumable training state next to the export
    nan_tolerance: int = Field(5, ge=1)  # consecutive non-finite losses that stop the run

    # --- distribution -------------------------------------------------------------------------
    launcher: Literal["auto", "inprocess", "accelerate"] = "auto"
    num_processes: int | None = Field(None, ge=1)  # None = every visible GPU (1 on CPU)
    accelerate_config: str | None = None  # accelerate config file (multi-node)
    main_process_port: int | None = None

    # --- outputs ------------------------------------------------------------------------------
    export_dtype: Literal["bf16", "fp16", "fp32"] = "fp16"
    export_diffusers: bool = True
    recommended_shift: float = 3.0  # written into the checkpoint metadata
    # Export names, like kohya's --output_name: <run_name>.safetensors (final), <run_name>-e0003.safetensors
    # (epoch 3), latest.safetensors (a link to the newest). None = "booruflow-<config name>", e.g.
    # booruflow-nai-v2-fm / booruflow-demo (tasks/train/export.py resolve_run_name).
    run_name: str | None = Field(None, min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
    export_every_epochs: int = Field(0, ge=0)  # also export a single file every N epochs (to try in ComfyUI); 0 = off
    keep_exports: int = Field(0, ge=0)  # the newest N epoch exports are kept (the final one always); 0 = all

    sampling: SamplingConfig = SamplingConfig()
    validation: ValidationConfig = ValidationConfig()
    ema: EmaConfig = EmaConfig()
    logging: LoggingConfig = LoggingConfig()

    # --- phases (tasks/phases.py) ------------------------------------------------------------------
    # Empty: one phase, this section as it is. Otherwise each phase is run in order with its overrides,
    # from the previous phase's export. Neither key is in the fingerprint: each phase's own config is.
    phases: list[PhaseConfig] = execution_field([])
    phase: str = execution_field("")  # set on a phase's own config: the name of the phase it runs

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.sampling.prompts and len(self.sampling.seeds) == 0:
            raise ValueError("sampling.seeds must name at least one seed when sampling.prompts is set")
        if any(not 0.0 < s < 1.0 for s in self.validation.sigmas):
            raise ValueError("validation.sigmas must lie strictly between 0 and 1")
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            raise ValueError(f"train.phases: phase names must be unique (got {names})")
        return self
