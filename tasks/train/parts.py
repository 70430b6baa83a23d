"""The parts of one training process, built once before the loop: the accelerate-prepared models, the
engine (optimiser, LR schedule), the micro-batch stream, the resume state, the held-out validation set, the
run's log and its exporter.

The order of the steps in `build_parts` is part of bit-exact training: the seed is set right before the
trainable models are placed, and a checkpoint (weights, optimiser, RNG states, data position) is loaded
only once accelerate has prepared them.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from data_contracts.cache import CacheManifest
from data_contracts.errors import StageError
from data_contracts.store import ArtifactStore
from pipeline_config.train import TrainConfig
from tasks.diffusion.objectives import Objective
from tasks.train.batches import PromptOptions, StepBatch, prepare_batch
from tasks.train.checkpoint import TrainerState, latest_checkpoint, load_checkpoint
from tasks.train.engine import (
    Ema,
    Engine,
    configure_backends,
    ddp_whole_graph,
    freeze_skipped_layers,
    make_optimizer,
    prepare_unet,
    warmup_constant,
)
from tasks.train.exporter import Exporter
from tasks.train.logs import Emit, RunLog, open_run_log
from tasks.train.stream import Prefetcher, epoch_stream

if TYPE_CHECKING:
    from tasks.train.loop import RunSpec

log = logging.getLogger("booruflow.train")


@dataclass(frozen=True)
class Models:
    """The networks. `unet` and `text_encoder` are what accelerate prepared (DDP-wrapped with several
    processes); `unet_module` and `te_module` the plain modules inside, for sampling, validation and exports."""

    source: Any  # tasks.models.sources.ModelSource
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    unet_module: torch.nn.Module
    te_module: torch.nn.Module
    vae: torch.nn.Module
    tokenizer: Any
    ema: Ema | None


@dataclass(frozen=True)
class TrainParts:
    """Fixed for the run, except `state`: the counters the loop advances and every checkpoint saves."""

    cfg: TrainConfig
    work: Path
    acc: Any  # accelerate.Accelerator
    manifest: CacheManifest
    models: Models
    objective: Objective
    engine: Engine  # it holds the optimiser and the LR schedule
    state: TrainerState
    reader_state: Any  # the data position the run resumes from; None from the start
    stream: Prefetcher
    heldout: list[dict[str, Any]]  # rank 0's validation samples; empty on other ranks or when off
    log: RunLog
    exporter: Exporter
    total: int  # optimiser steps of the whole run
    steps_per_epoch: int  # micro-batches of one epoch, per process


def build_parts(spec: RunSpec, cfg: TrainConfig, acc: Any, emit: Emit) -> TrainParts:
    work, device, main = Path(spec.work), acc.device, acc.is_main_process
    store = ArtifactStore(spec.data_root, spec.local_cache)
    manifest = store.read_manifest(CacheManifest, spec.cache_fingerprint)
    source, comps = load_models(cfg, acc, Path(spec.model_cache_dir))
    if manifest.vae_identity != source.identity:
        log.warning("cache latents came from model %s, training %s: make sure both share the same VAE",
                    manifest.vae_identity[:12], source.identity[:12])
    configure_backends(device, cfg.attention_backend)
    mode = compile_mode(cfg, device, acc.num_processes)
    if cfg.compile and mode != cfg.compile_mode:
        log.info("train.compile_mode=%s applies to one process on a GPU; %d process(es) on %s compile in "
                 "the default mode", cfg.compile_mode, acc.num_processes, device.type)
    torch.manual_seed(cfg.seed)
    unet, te = place_models(cfg, comps, acc, mode, spec.model_cache_dir)
    optimizer = make_optimizer(param_groups(cfg, unet, te), kind=cfg.optimizer, lr=cfg.lr, betas=cfg.betas,
                               eps=cfg.eps, weight_decay=cfg.weight_decay, device=device)
    reader = make_reader(manifest, store, cfg, rank=acc.process_index, world=acc.num_processes)
    spe = reader.steps_per_epoch()
    total = plan_steps(cfg, spe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_constant(total, cfg.warmup))
    if cfg.train_text_encoder:
        unet, te, optimizer = acc.prepare(unet, te, optimizer)
    else:
        unet, optimizer = acc.prepare(unet, optimizer)
    unet_module, te_module = acc.unwrap_model(unet), acc.unwrap_model(te)
    ema = Ema([p for p in unet_module.parameters() if p.requires_grad], cfg.ema.decay) if cfg.ema.enabled else None
    models = Models(source, unet, te, unet_module, te_module, comps.vae, comps.tokenizer, ema)
    objective = Objective.from_config(cfg)
    engine = Engine(acc, unet, optimizer, scheduler, objective, grad_accum=cfg.grad_accum,
                    max_grad_norm=cfg.max_grad_norm, text_encoder=te, text_encoder_module=te_module,
                    train_text_encoder=cfg.train_text_encoder, clip_skip=cfg.clip_skip,
                    channels_last=cfg.channels_last, ema=ema, cudagraphs=cfg.compile and mode == "reduce-overhead")
    state, reader_state = resume(work, cfg, acc, engine, models, total, emit)
    exporter = Exporter(cfg, work, models, manifest=manifest, store=store, steps_per_epoch=spe, total=total,
                        world_size=acc.num_processes, emit=emit)
    if main:
        exporter.prepare(state)
    heldout = load_heldout(cfg, manifest, store) if main else []
    run_log = open_run_log(cfg, work, resume_step=state.step, samples_seen=state.samples_seen, total=total,
                           steps_per_epoch=spe, main=main, emit=emit)
    # Last: its thread starts reading at once, and nothing after it can fail and leave it running.
    stream = open_stream(cfg, manifest, reader, objective, device, state, reader_state)
    return TrainParts(cfg=cfg, work=work, acc=acc, manifest=manifest, models=models, objective=objective,
                      engine=engine, state=state, reader_state=reader_state, stream=stream, heldout=heldout,
                      log=run_log, exporter=exporter, total=total, steps_per_epoch=spe)


def load_models(cfg: TrainConfig, acc: Any, cache_dir: Path):
    """(model source, SD15Components) on the CPU in fp32."""
    from tasks.models.load import load_sd15
    from tasks.models.sources import resolve_model_source

    with acc.main_process_first():  # the main process builds builtins / tokenizer once
        source = resolve_model_source(cfg.model, cache_dir)
        comps = load_sd15(source, ("unet", "vae", "text_encoder", "tokenizer"), dtype=torch.float32,
                          device="cpu", cache_dir=cache_dir)
    return source, comps


def compile_mode(cfg: TrainConfig, device: torch.device, processes: int) -> str:
    """CUDA graphs only where measured: one process on a GPU (DDP and the CPU use the default mode)."""
    if cfg.compile_mode != "reduce-overhead":
        return cfg.compile_mode
    if device.type != "cuda" or processes > 1:
        return "default"
    return "reduce-overhead"


def place_models(cfg: TrainConfig, comps: Any, acc: Any, mode: str, cache_dir: str
                 ) -> tuple[torch.nn.Module, torch.nn.Module]:
    """UNet and text encoder on the device, set up to train (or frozen); the VAE (rank 0 samples with it)."""
    device = acc.device
    unet = comps.unet.to(device)
    prepare_unet(unet, gradient_checkpointing=cfg.gradient_checkpointing, channels_last=cfg.channels_last,
                 compile=cfg.compile, compile_mode=mode, ddp_whole_graph=ddp_whole_graph(acc.num_processes,
                                                                                         cfg.grad_accum),
                 compile_strategy=cfg.compile_strategy,  # compiled graphs kept under runtime.cache_dir
                 compile_cache_dir=cache_dir if cfg.compile_cache else None)
    te = comps.text_encoder.to(device)
    te.requires_grad_(cfg.train_text_encoder)
    if cfg.train_text_encoder:
        freeze_skipped_layers(te, cfg.clip_skip)
        te.train()
    else:
        te.eval()
    comps.vae.requires_grad_(False)
    if acc.is_main_process:
        comps.vae.to(device)
    return unet, te


def param_groups(cfg: TrainConfig, unet: torch.nn.Module, te: torch.nn.Module) -> list[dict[str, Any]]:
    groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": cfg.lr}]
    if cfg.train_text_encoder:
        groups.append({"params": [p for p in te.parameters() if p.requires_grad], "lr": cfg.text_encoder_lr})
    return groups


def make_reader(manifest: CacheManifest, store: ArtifactStore, cfg: TrainConfig, *, rank: int, world: int):
    from tasks.cache.reader import ChunkReader

    return ChunkReader(manifest, store, batch_size=cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world,
                       shuffle_buffer=cfg.shuffle_buffer, prefetch=cfg.prefetch, drop_last=True)


def plan_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Optimiser steps of the run: max_steps when set, else whole accumulation windows in `epochs`."""
    if cfg.max_steps:
        return cfg.max_steps
    total = (cfg.epochs * steps_per_epoch) // cfg.grad_accum
    if total < 1:
        raise StageError(
            f"{cfg.epochs} epoch(s) × {steps_per_epoch} batch(es) per process is less than one optimiser step of "
            f"train.grad_accum={cfg.grad_accum}: lower train.grad_accum or train.batch_size, or raise train.epochs")
    return total


def resume(work: Path, cfg: TrainConfig, acc: Any, engine: Engine, models: Models, total: int, emit: Emit
           ) -> tuple[TrainerState, Any]:
    """(trainer state, reader state) from the newest checkpoint, loaded into the prepared objects; a fresh
    state and no data position when there is none."""
    state = TrainerState(world_size=acc.num_processes, total_steps=total)
    reader_state = None
    ckpt = latest_checkpoint(work)
    if ckpt is not None:
        restored = load_checkpoint(ckpt, acc, unet=models.unet, optimizer=engine.optimizer,
                                   scheduler=engine.scheduler,
                                   text_encoder=models.text_encoder if cfg.train_text_encoder else None,
                                   ema=models.ema)
        state, reader_state = restored.state, restored.reader_state
        state.total_steps = total
        log.info("resuming from %s (step %d of %d)", ckpt.name, state.step, total)
        emit({"event": "resume", "step": state.step, "checkpoint": ckpt.name})
    # The start of the run's first attempt (kept in every checkpoint): ss_training_started_at.
    state.extra.setdefault("training_started_at", time.time())
    return state, reader_state


def load_heldout(cfg: TrainConfig, manifest: CacheManifest, store: ArtifactStore) -> list[dict[str, Any]]:
    from tasks.train.validation import load_heldout as load

    return load(manifest, store, cfg.validation.fraction, cfg.validation.max_samples)


def open_stream(cfg: TrainConfig, manifest: CacheManifest, reader: Any, objective: Objective,
                device: torch.device, state: TrainerState, reader_state: Any) -> Prefetcher:
    """Prepared micro-batches on a background thread, from where the checkpoint left off (or the start)."""
    prompts = PromptOptions(max_chunks=cfg.max_chunks, caption_dropout=cfg.caption_dropout,
                            tag_dropout=cfg.tag_dropout, shuffle_general=cfg.shuffle_general)
    pin = device.type == "cuda"

    def prepare(epoch: int, batch: dict, rstate: Any) -> StepBatch:
        b = prepare_batch(batch, epoch=epoch, seed=cfg.seed, objective=objective,
                          scaling_factor=manifest.scaling_factor, prompts=prompts,
                          holdout_fraction=cfg.validation.fraction, reader_state=rstate)
        return b.pin() if pin else b

    start_epoch = state.epoch if reader_state is not None else 0
    return Prefetcher(epoch_stream(reader, start_epoch, reader_state), prepare, depth=cfg.prefetch)
