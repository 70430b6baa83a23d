"""The training step itself, shared by the loop and bench/bench_train.py.

What makes it fast (measured in bench/bench_train.py on an H100):
- fp32 master weights, bf16 autocast, SDPA (backend selectable: cuDNN attention suits Hopper),
- torch.compile with static shapes (one graph per bucket shape; the recompile limit is raised so the
  ~17 buckets × chunk counts all get their own graph instead of falling back to eager), or per UNet block
  with symbolic height/width (`train.compile_strategy: regional`, one set of small graphs for every bucket);
  compiled graphs are kept under runtime.cache_dir, keyed (tasks/train/compile_cache.py),
- channels_last activations and cudnn.benchmark (static shapes per bucket),
- the optimiser runs once per `grad_accum` micro-batches (DDP all-reduce too: `no_sync` in between),
  so 8-bit AdamW / fused AdamW cost is amortised,
- no host sync inside the accumulation window: the loss is summed on the device and checked for NaN/inf
  once per optimiser step (the gradient norm, already all-reduced, is identical on every rank).
"""
from __future__ import annotations

import contextlib
import logging
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from data_contracts.errors import ConfigError
from tasks.diffusion.objectives import Objective, weighted_mse
from tasks.models.text_encode import final_layer_norm
from tasks.train.batches import StepBatch
from tasks.train.compile_cache import (
    DYNAMIC_HW_ATTR,
    compile_cache_key,
    compile_regions,
    configure_dynamic_shapes,
    environment_identity,
    mark_latent_dynamic,
    model_identity,
    use_compile_cache,
)

log = logging.getLogger("booruflow.train")

RECOMPILE_LIMIT = 128  # bucket shapes × chunk counts; each gets a static graph


_SDP_ORDER = {"flash": ("flash", "efficient", "cudnn"), "efficient": ("efficient", "flash", "cudnn"),
              "cudnn": ("cudnn", "flash", "efficient")}


def configure_backends(device: torch.device, attention: str = "auto", cudnn_benchmark: bool = True) -> None:
    """Process-wide switches: cudnn autotuning (per conv shape, on its first use), TF32, the SDPA backend order.

    `attention` puts one SDPA backend first and keeps the others as fallbacks for shapes it cannot run
    (cuDNN attention takes SD1.5's 40/80-wide heads; the 160-wide ones of the lowest level may fall back).
    """
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if attention == "auto":
        return
    from torch.nn.attention import SDPBackend

    ids = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
           "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    enable = {"flash": torch.backends.cuda.enable_flash_sdp, "efficient": torch.backends.cuda.enable_mem_efficient_sdp,
              "cudnn": torch.backends.cuda.enable_cudnn_sdp, "math": torch.backends.cuda.enable_math_sdp}
    order = _SDP_ORDER.get(attention, ())
    for name, fn in enable.items():
        fn(name == "math" or name in order)
    if order and hasattr(torch._C, "_set_sdp_priority_order"):
        rest = [b for b in (SDPBackend.MATH, SDPBackend.OVERRIDEABLE) if b not in [ids[n] for n in order]]
        torch._C._set_sdp_priority_order([int(ids[n].value) for n in order] + [int(b.value) for b in rest])
    elif order:  # no priority API: only the asked-for backend (+ math) stays on
        for name, fn in enable.items():
            fn(name in ("math", attention))


def ddp_whole_graph(processes: int, grad_accum: int) -> bool:
    """Compile the whole UNet under DDP (see prepare_unet) when gradients sync on one micro-step in N."""
    return processes > 1 and grad_accum > 1


def resolve_compile_strategy(strategy: str, *, ddp: bool) -> str:
    """"auto": regional on one process (H100, 17-bucket stream: all buckets at speed 4.6 min after a cold start
    instead of ~45 min, same per-step device time, 9.2 vs 17.5 GiB allocated; BENCHMARKS.md), static under DDP,
    where regional blocks with CUDA graphs have not been measured yet."""
    if strategy != "auto":
        return strategy
    return "static" if ddp else "regional"


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def prepare_unet(unet: torch.nn.Module, *, gradient_checkpointing: bool = False, channels_last: bool = False,
                 compile: bool = False, compile_mode: str | None = None, compile_tuning: bool = False,
                 ddp_whole_graph: bool = False, compile_strategy: str = "auto",
                 compile_cache_dir: str | Path | None = None, compile_backend: str = "inductor") -> torch.nn.Module:
    """Train mode, SDPA attention, optional checkpointing / channels_last / torch.compile (in place).

    `compile_strategy`: "auto" is "regional" on one process and "static" under DDP (resolve_compile_strategy);
    "static" compiles the whole UNet once per bucket shape (a full compile each, ~160 s
    cold on an H100); "dynamic" marks the latent height/width symbolic so one whole-UNet graph serves every
    bucket (the Engine marks each micro-batch); "regional" compiles each ResNet / transformer block on its own
    with symbolic height/width, so a handful of small graphs serve every block and bucket (see
    tasks/train/compile_cache.py). `compile_cache_dir` (runtime.cache_dir) keeps the compiled graphs on disk
    under a key of model, options and environment, so a rerun or resume on the same kind of machine loads
    them instead of generating code again (dynamo still traces). `compile_backend` is for tests ("aot_eager"
    runs the same tracing on CPU without code generation).

    `nn.Module.compile` keeps the module and its state_dict keys as they are; `unet.forward(...)` still runs
    eagerly, which the sampler and validation use so their other batch shapes never trigger compiles
    (regionally compiled blocks run eagerly under no_grad, which both use, for the same reason).

    `ddp_whole_graph`: under DDP, dynamo's DDPOptimizer splits the compiled graph at every gradient bucket
    (about 140 pieces for the SD UNet at DDP's 25 MB buckets) so that all-reduce overlaps the backward pass.
    With gradient accumulation only one micro-step in N all-reduces, and the split graphs cost more than the
    overlap saves, so the whole graph is compiled and DDP's hooks all-reduce after the backward pass.
    """
    unet.train()
    unet.requires_grad_(True)
    if hasattr(unet, "set_attn_processor"):
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())  # SDPA
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if compile_strategy not in ("auto", "static", "dynamic", "regional"):
        raise ConfigError(f"train.compile_strategy={compile_strategy!r}: expected auto, static or regional")
    compile_strategy = resolve_compile_strategy(compile_strategy, ddp=ddp_whole_graph or _distributed())
    setattr(unet, DYNAMIC_HW_ATTR, bool(compile and compile_strategy == "dynamic"))
    if compile:
        options = {"mode": compile_mode or "default", "strategy": compile_strategy, "backend": compile_backend,
                   "channels_last": channels_last, "gradient_checkpointing": gradient_checkpointing,
                   "tuning": compile_tuning, "ddp_whole_graph": ddp_whole_graph, "sdpa": _sdpa_flags()}
        if compile_cache_dir is not None:
            env = environment_identity(_module_device(unet))
            model = model_identity(unet)
            key = compile_cache_key(model, options, env)
            folder = use_compile_cache(compile_cache_dir, key, {"model": model, "options": options, "env": env})
            log.info("compile cache: %s", folder)
        if compile_strategy != "static":
            configure_dynamic_shapes()
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, RECOMPILE_LIMIT)
        if hasattr(torch._dynamo.config, "recompile_limit"):
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        if compile_tuning:  # inductor benchmarks tile sizes of its own (norm/elementwise) kernels: slower compile
            import torch._inductor.config as inductor_config

            inductor_config.coordinate_descent_tuning = True
        torch._dynamo.config.optimize_ddp = not ddp_whole_graph
        mode = None if compile_mode in (None, "default") or compile_backend != "inductor" else compile_mode
        # dynamic=False: nothing becomes symbolic by itself (automatic dynamic would recompile a second,
        # all-symbolic graph); the dims marked (context length; latent / block-input H/W) are.
        if compile_strategy == "regional":
            log.info("compile: %d UNet blocks compiled on their own", compile_regions(unet, mode=mode,
                                                                                    backend=compile_backend))
        else:
            unet.compile(dynamic=False, mode=mode, backend=compile_backend)
    return unet


def _module_device(module: torch.nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _sdpa_flags() -> dict[str, bool]:
    """Which SDPA backends are on (configure_backends): the traced attention op depends on them."""
    cuda = torch.backends.cuda
    return {name: bool(getattr(cuda, fn)()) for name, fn in
            (("flash", "flash_sdp_enabled"), ("efficient", "mem_efficient_sdp_enabled"),
             ("cudnn", "cudnn_sdp_enabled"), ("math", "math_sdp_enabled")) if hasattr(cuda, fn)}


def keep_channels_last(params: Iterable[torch.Tensor]) -> None:
    """bitsandbytes' 8-bit step makes every parameter contiguous (`p.data = p.data.contiguous()`); a compiled
    channels_last graph asserts its weights' strides, so 4-D weights go back to channels_last (a copy of the
    conv weights once per optimiser step; its update is element-wise, so the math is unaffected)."""
    for p in params:
        if p.dim() == 4 and not p.is_contiguous(memory_format=torch.channels_last):
            p.data = p.data.contiguous(memory_format=torch.channels_last)


def make_optimizer(param_groups: list[dict[str, Any]], *, kind: str, lr: float, betas=(0.9, 0.999),
                   eps: float = 1e-8, weight_decay: float = 1e-2, device: torch.device | None = None
                   ) -> torch.optim.Optimizer:
    if kind == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:  # pragma: no cover - bitsandbytes is a dependency
            raise ConfigError("train.optimizer=adamw8bit needs bitsandbytes; install it or set train.optimizer=adamw") from exc
        return bnb.optim.AdamW8bit(param_groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    if kind == "adamw":
        fused = device is not None and device.type == "cuda"
        return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                 fused=fused or None, foreach=None if fused else True)
    raise ConfigError(f"train.optimizer={kind!r}: expected adamw8bit or adamw")


def warmup_constant(total_steps: int, warmup: float) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over round(warmup·total) steps (first step > 0), then constant 1."""
    warm = int(round(warmup * total_steps))

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warm) if warm > 0 else 1.0

    return factor


def encode_prompts(text_encoder: torch.nn.Module, module: torch.nn.Module, ids: torch.Tensor,
                   clip_skip: int) -> torch.Tensor:
    """[B,K,77] ids -> [B,77K,D] (chunks encoded alone, concatenated; CLIP skip + final layer norm).

    `text_encoder` is what is called (possibly DDP-wrapped, so gradients sync); `module` the bare model
    whose final layer norm is applied — the same math as tasks.models.text_encode.encode_chunks.
    """
    b, k, n = ids.shape
    out = text_encoder(input_ids=ids.reshape(b * k, n), output_hidden_states=True)
    z = final_layer_norm(module)(out.hidden_states[-clip_skip])
    return z.reshape(b, k * n, z.shape[-1])


def freeze_skipped_layers(text_encoder: torch.nn.Module, clip_skip: int) -> None:
    """Layers after the one CLIP skip reads never affect the loss: freeze them (DDP needs every
    trainable parameter to get a gradient)."""
    layers = (text_encoder.encoder.layers if hasattr(text_encoder, "encoder")
              else text_encoder.text_model.encoder.layers)
    for layer in list(layers)[len(layers) - (clip_skip - 1):] if clip_skip > 1 else []:
        layer.requires_grad_(False)


class Ema:
    """Exponential moving average of the trainable UNet weights, fp32, on the training device."""

    def __init__(self, params: Iterable[torch.Tensor], decay: float) -> None:
        self.params = [p for p in params]
        self.shadow = [p.detach().clone().float() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {str(i): t for i, t in enumerate(self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, t in enumerate(self.shadow):
            t.copy_(state[str(i)])

    @torch.no_grad()
    def copy_to(self, params: Iterable[torch.Tensor]) -> None:
        for p, s in zip(params, self.shadow):
            p.copy_(s.to(p.dtype))


@dataclass
class StepOutcome:
    loss: float  # mean micro-batch loss over the accumulation window and all ranks
    grad_norm: float
    applied: bool  # False: non-finite loss/gradients, the update was skipped


class Engine:
    """Micro-steps and optimiser steps of one process. Everything here stays on the device."""

    def __init__(self, accelerator, unet, optimizer, scheduler, objective: Objective, *, grad_accum: int,
                 max_grad_norm: float, text_encoder=None, text_encoder_module=None, train_text_encoder: bool = False,
                 clip_skip: int = 2, channels_last: bool = False, ema: Ema | None = None,
                 cudagraphs: bool = False) -> None:
        self.acc = accelerator
        self.unet = unet
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.objective = objective
        self.grad_accum = grad_accum
        self.max_grad_norm = max_grad_norm
        self.text_encoder = text_encoder
        self.te_module = text_encoder_module if text_encoder_module is not None else text_encoder
        self.train_te = train_text_encoder
        self.clip_skip = clip_skip
        self.channels_last = channels_last
        self.ema = ema
        self.device = accelerator.device
        self._loss_sum = torch.zeros((), device=self.device)
        self._micro = 0
        self.params = [p for p in accelerator.unwrap_model(unet).parameters() if p.requires_grad]
        # prepare_unet(compile_strategy="dynamic"): one graph for every bucket, latent H/W marked per micro-batch
        self.dynamic_hw = bool(getattr(accelerator.unwrap_model(unet), DYNAMIC_HW_ATTR, False))
        if train_text_encoder:
            self.params += [p for p in self.te_module.parameters() if p.requires_grad]
        # CUDA graphs (compile mode reduce-overhead) own their outputs' memory: a gradient must never *be* a
        # graph output (autograd would adopt it as .grad when .grad is None), so gradients live in buffers
        # of their own, zeroed instead of freed, and each micro-step starts a new graph step.
        self.cudagraphs = cudagraphs
        if cudagraphs:
            for p in self.params:
                p.grad = torch.zeros_like(p)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=True)

    def context(self, token_ids: torch.Tensor) -> torch.Tensor:
        ids = self._to_device(token_ids)
        if self.train_te:
            return encode_prompts(self.text_encoder, self.te_module, ids, self.clip_skip)
        with torch.no_grad(), self.acc.autocast():
            return encode_prompts(self.text_encoder, self.te_module, ids, self.clip_skip)

    def loss(self, b: StepBatch) -> torch.Tensor:
        x0, noise, weight = self._to_device(b.x0), self._to_device(b.noise), self._to_device(b.weight)
        context = self.context(b.token_ids)
        # One compiled graph per bucket whatever the prompt's chunk count: only the context length is
        # symbolic (latent shapes stay static: dynamic convolutions are much slower).
        torch._dynamo.maybe_mark_dynamic(context, 1)
        x_t, timestep, target, t_weight = self.objective.inputs(x0, noise, b.levels)
        if self.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        if self.dynamic_hw:
            mark_latent_dynamic(x_t)
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        pred = self.unet(x_t, timestep, encoder_hidden_states=context, return_dict=False)[0]
        loss, _ = weighted_mse(pred, target, weight * t_weight)
        return loss

    def micro_step(self, b: StepBatch) -> None:
        """Forward + backward of one micro-batch; gradients sync across ranks on the window's last one."""
        last = self._micro == self.grad_accum - 1
        with contextlib.ExitStack() as stack:
            if not last:
                stack.enter_context(self.acc.no_sync(self.unet))
                if self.train_te:
                    stack.enter_context(self.acc.no_sync(self.text_encoder))
            loss = self.loss(b)
            self.acc.backward(loss / self.grad_accum)
        self._loss_sum += loss.detach().float()
        self._micro += 1

    @property
    def window_full(self) -> bool:
        return self._micro >= self.grad_accum

    def optimizer_step(self) -> StepOutcome:
        """Clip, check finiteness (one host sync), step or skip, advance the schedule, zero the grads."""
        if self._micro != self.grad_accum:
            raise RuntimeError(f"optimizer_step after {self._micro} of {self.grad_accum} micro-batches")
        max_norm = self.max_grad_norm if self.max_grad_norm > 0 else math.inf
        grad_norm = self.acc.clip_grad_norm_(self.params, max_norm)
        # Mean over ranks: a NaN on any rank makes every rank skip (gradients are all-reduced already).
        mean_loss = self.acc.reduce(self._loss_sum / self.grad_accum, reduction="mean")
        stats = torch.stack([mean_loss, torch.as_tensor(grad_norm, device=self.device).float()])
        loss, norm = (float(v) for v in stats.tolist())
        fp16 = self.acc.mixed_precision == "fp16"
        applied = math.isfinite(loss) and (math.isfinite(norm) or fp16)
        if applied:
            self.optimizer.step()  # under fp16 the grad scaler itself skips inf/NaN gradients
            if self.channels_last:
                keep_channels_last(self.params)
            if self.ema is not None:
                self.ema.update()
        with warnings.catch_warnings():  # a skipped first update makes torch warn about the call order
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=not self.cudagraphs)
        self._loss_sum.zero_()
        self._micro = 0
        return StepOutcome(loss=loss, grad_norm=norm, applied=applied)
