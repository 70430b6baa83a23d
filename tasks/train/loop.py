"""The training run of one process (naifu-style short loop under accelerate).

`run_training(spec)` is what every process runs: in-process for one GPU/CPU, or under `accelerate launch`
(tasks/train/worker.py) for several. Rank 0 writes the history, TensorBoard logs, samples, validation
numbers, the export and `result.json`; every rank takes part in checkpoints.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from data_contracts.cache import CacheManifest
from data_contracts.errors import ConfigError, StageError
from data_contracts.store import ArtifactStore, atomic_write_text
from pipeline_config.train import TrainConfig
from tasks.train.batches import PromptOptions, StepBatch, prepare_batch
from tasks.train.checkpoint import (PREFIX, TrainerState, checkpoint_root, latest_checkpoint, load_checkpoint,
                                   save_checkpoint)
from tasks.train.engine import (Ema, Engine, configure_backends, ddp_whole_graph, encode_prompts,
                                freeze_skipped_layers, make_optimizer, prepare_unet, warmup_constant)
from tasks.train.objective import Objective
from tasks.train.stream import Prefetcher, epoch_stream

log = logging.getLogger("booruflow.train")

EVENT_PREFIX = "@@booruflow-train "
RESULT_NAME = "result.json"
HISTORY_JSONL = "history.jsonl"
# Fault injection for the kill/resume test: SIGKILL this process right after the given optimiser step.
KILL_ENV = "BOORUFLOW_TRAIN_KILL_AT_STEP"
# Seconds between two step lines in the log (besides the first step, each epoch end and the last step).
TALK_ENV = "BOORUFLOW_TRAIN_LOG_EVERY_S"
TALK_EVERY_S = 30.0

Emit = Callable[[dict[str, Any]], None]


@dataclass
class RunSpec:
    """Everything a training process needs; JSON-serialisable (written to <work>/run.json)."""

    train: dict[str, Any]  # TrainConfig as JSON
    work: str  # the stage's work folder (checkpoints, logs, outputs)
    data_root: str
    local_cache: str
    cache_fingerprint: str
    model_cache_dir: str  # runtime.cache_dir: built tiny models, tokenizer
    device: str = "auto"  # auto | cpu | cuda

    def save(self, path: Path) -> None:
        """`work` is written as "." when it is the file's own folder: the train stage's run.json lives in its
        work folder, which the commit renames into the output, so an absolute path would name a deleted folder."""
        data = asdict(self)
        if Path(self.work).resolve() == Path(path).resolve().parent:
            data["work"] = "."
        atomic_write_text(path, json.dumps(data, indent=1))

    @classmethod
    def load(cls, path: Path) -> "RunSpec":
        """A relative `work` is relative to the file's folder (wherever that folder is now)."""
        path = Path(path).absolute()
        data = json.loads(path.read_text())
        data["work"] = str(path.parent / data["work"])  # an absolute one stays as it is
        return cls(**data)


def print_event(event: dict[str, Any]) -> None:
    print(EVENT_PREFIX + json.dumps(event, default=str), flush=True)


def use_cpu(device: str) -> bool:
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


def make_accelerator(cfg: TrainConfig, cpu: bool):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if not torch.distributed.is_initialized():
        AcceleratorState._reset_state(reset_partial_state=True)  # a fresh run in a long-lived process
    mp = cfg.mixed_precision
    return Accelerator(cpu=cpu, mixed_precision=mp, step_scheduler_with_optimizer=False)


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


def checkpoint_step(path: Path) -> int | None:
    """The optimiser step a checkpoint folder (`step-00001000`) was saved after; None for other names."""
    digits = path.name.removeprefix(PREFIX)
    return int(digits) if path.name.startswith(PREFIX) and digits.isdigit() else None


def checkpoint_before(work: Path, step: int) -> Path | None:
    """The newest complete checkpoint saved before optimiser step `step` ran (its own step < `step`)."""
    found = [(n, p) for p in checkpoint_root(work).glob(f"{PREFIX}*")
             if (n := checkpoint_step(p)) is not None and n < step and (p / "trainer.json").is_file()]
    return max(found)[1] if found else None


def nan_stop_message(work: Path, step: int, bad_in_row: int, tolerance: int) -> str:
    """Why training stopped on `bad_in_row` non-finite steps ending at `step`. It names only a checkpoint
    saved before the first of them: one saved during the bad run came after the fault began, so it is newer
    but not known good (whatever caused the fault is in its state or its data position)."""
    first_bad = step - bad_in_row + 1
    good = checkpoint_before(work, first_bad)
    if good is not None:
        where = f"The newest checkpoint saved before the first non-finite step ({first_bad}) is {good}"
    else:
        newest = latest_checkpoint(work)
        after = f"; {newest} was saved after it" if newest is not None else ""
        where = (f"No checkpoint saved before the first non-finite step ({first_bad}) is left, so none is known "
                 f"good{after}")
    return (f"training stopped at step {step}: {bad_in_row} optimiser steps in a row had a non-finite loss or "
            f"gradient (train.nan_tolerance={tolerance}). {where}. Lower train.lr, use train.mixed_precision=bf16 "
            "instead of fp16, or check the cached latents")


class StepTalk:
    """When training says a step line, and what it says: the first optimiser step (this run or after a
    resume), then every `every_s` seconds, each epoch end and the last step. The loss is smoothed (bias-
    corrected EMA, as TensorBoard does); samples/s is over the span since the previous line; the ETA is the
    pace since the first step (so compile and model loading do not inflate it) times the steps left."""

    def __init__(self, total: int, start_step: int, steps_per_epoch: int, grad_accum: int, every_s: float,
                 start_samples: int = 0, clock: Callable[[], float] = time.monotonic, beta: float = 0.9) -> None:
        self.total, self.start_step, self.spe, self.every_s = total, start_step, max(1, steps_per_epoch), every_s
        self.start_samples = start_samples
        self.epochs = max(1, math.ceil(total * grad_accum / self.spe))
        self.clock, self.beta = clock, beta
        self.t0 = clock()
        self.t_first: float | None = None
        self.first_step = start_step
        self.last_t, self.last_samples = self.t0, None
        self.ema, self.ema_n = 0.0, 0

    def update(self, step: int, micro_batches: int, grad_accum: int, loss: float, lr: float,
               samples_seen: int) -> dict[str, Any] | None:
        """Called after every optimiser step; the `step` event to emit, or None."""
        now = self.clock()
        if math.isfinite(loss):
            self.ema, self.ema_n = self.beta * self.ema + (1 - self.beta) * loss, self.ema_n + 1
        first = self.t_first is None
        if first:
            self.t_first, self.first_step = now, step
        epoch_end = micro_batches // self.spe > (micro_batches - grad_accum) // self.spe
        final = step >= self.total
        if not (first or final or epoch_end or now - self.last_t >= self.every_s):
            return None
        span, done = now - self.last_t, samples_seen - (self.start_samples if self.last_samples is None
                                                         else self.last_samples)
        pace = ((now - self.t_first) / (step - self.first_step) if step > self.first_step
                else (now - self.t0) / max(1, step - self.start_step))
        smoothed = self.ema / (1 - self.beta ** self.ema_n) if self.ema_n else float("nan")
        self.last_t, self.last_samples = now, samples_seen
        return {"event": "step", "step": step, "total_steps": self.total,
                "epoch": min(self.epochs, (micro_batches - 1) // self.spe + 1), "epochs": self.epochs,
                "epoch_end": epoch_end, "loss": loss, "loss_smoothed": smoothed, "lr": lr,
                "samples_per_s": done / span if span > 0 else None,
                "elapsed_s": now - self.t0, "eta_s": max(0.0, (self.total - step) * pace)}


class History:
    """history.jsonl on rank 0 (append + fsync per row); resumed runs drop rows past the checkpoint."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        rows = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if row["step"] <= resume_step:
                    rows.append(row)
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        self.rows = rows

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def run_training(spec: RunSpec, emit: Emit | None = None) -> dict[str, Any]:
    cfg = TrainConfig.model_validate(spec.train)
    work = Path(spec.work)
    cpu = use_cpu(spec.device)
    acc = make_accelerator(cfg, cpu)
    main = acc.is_main_process
    emit = emit if (emit is not None and main) else (lambda e: None)
    try:
        return _Run(spec, cfg, work, acc, emit).run()
    finally:
        acc.wait_for_everyone()
        acc.end_training()


class _Run:
    def __init__(self, spec: RunSpec, cfg: TrainConfig, work: Path, acc, emit: Emit) -> None:
        self.spec, self.cfg, self.work, self.acc, self.emit = spec, cfg, work, acc, emit
        self.main = acc.is_main_process
        self.device = acc.device
        self._data = None  # the dataset summary of the exports' headers, read at the first export

    # ------------------------------------------------------------------------------ setup
    def _load_models(self):
        from tasks.models.load import load_sd15
        from tasks.models.sources import resolve_model_source

        cache_dir = Path(self.spec.model_cache_dir)
        with self.acc.main_process_first():  # the main process builds builtins / tokenizer once
            source = resolve_model_source(self.cfg.model, cache_dir)
            comps = load_sd15(source, ("unet", "vae", "text_encoder", "tokenizer"), dtype=torch.float32,
                              device="cpu", cache_dir=cache_dir)
        return source, comps

    @property
    def compile_mode(self) -> str:
        """CUDA graphs only where measured: one process on a GPU (DDP and the CPU use the default mode)."""
        if self.cfg.compile_mode != "reduce-overhead":
            return self.cfg.compile_mode
        if self.device.type != "cuda" or self.acc.num_processes > 1:
            return "default"
        return "reduce-overhead"

    def run(self) -> dict[str, Any]:
        cfg, acc = self.cfg, self.acc
        t_start = time.time()
        store = ArtifactStore(self.spec.data_root, self.spec.local_cache)
        manifest = store.read_manifest(CacheManifest, self.spec.cache_fingerprint)
        self.manifest = manifest
        source, comps = self._load_models()
        self.source, self.comps = source, comps
        if manifest.vae_identity != source.identity:
            log.warning("cache latents came from model %s, training %s: make sure both share the same VAE",
                        manifest.vae_identity[:12], source.identity[:12])
        configure_backends(self.device, cfg.attention_backend)
        if cfg.compile and self.compile_mode != cfg.compile_mode:
            log.info("train.compile_mode=%s applies to one process on a GPU; %d process(es) on %s compile in "
                     "the default mode", cfg.compile_mode, acc.num_processes, self.device.type)
        torch.manual_seed(cfg.seed)

        unet = comps.unet.to(self.device)
        prepare_unet(unet, gradient_checkpointing=cfg.gradient_checkpointing, channels_last=cfg.channels_last,
                     compile=cfg.compile, compile_mode=self.compile_mode,
                     ddp_whole_graph=ddp_whole_graph(acc.num_processes, cfg.grad_accum),
                     compile_strategy=cfg.compile_strategy,  # compiled graphs kept under runtime.cache_dir
                     compile_cache_dir=self.spec.model_cache_dir if cfg.compile_cache else None)
        te = comps.text_encoder.to(self.device)
        te.requires_grad_(cfg.train_text_encoder)
        if cfg.train_text_encoder:
            freeze_skipped_layers(te, cfg.clip_skip)
            te.train()
        else:
            te.eval()
        comps.vae.requires_grad_(False)
        if self.main:
            comps.vae.to(self.device)

        groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": cfg.lr}]
        if cfg.train_text_encoder:
            groups.append({"params": [p for p in te.parameters() if p.requires_grad], "lr": cfg.text_encoder_lr})
        optimizer = make_optimizer(groups, kind=cfg.optimizer, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                   weight_decay=cfg.weight_decay, device=self.device)

        reader = make_reader(manifest, store, cfg, rank=acc.process_index, world=acc.num_processes)
        spe = reader.steps_per_epoch()
        total = plan_steps(cfg, spe)
        self.store, self.spe, self.total = store, spe, total
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_constant(total, cfg.warmup))
        if cfg.train_text_encoder:
            unet, te, optimizer = acc.prepare(unet, te, optimizer)
        else:
            unet, optimizer = acc.prepare(unet, optimizer)
        self.unet, self.te = unet, te
        self.unet_module = acc.unwrap_model(unet)
        self.te_module = acc.unwrap_model(te)
        ema = Ema([p for p in self.unet_module.parameters() if p.requires_grad], cfg.ema.decay) if cfg.ema.enabled else None
        self.ema = ema
        objective = Objective.from_config(cfg)
        self.objective = objective
        engine = Engine(acc, unet, optimizer, scheduler, objective, grad_accum=cfg.grad_accum,
                        max_grad_norm=cfg.max_grad_norm, text_encoder=te, text_encoder_module=self.te_module,
                        train_text_encoder=cfg.train_text_encoder, clip_skip=cfg.clip_skip,
                        channels_last=cfg.channels_last, ema=ema,
                        cudagraphs=cfg.compile and self.compile_mode == "reduce-overhead")

        state = TrainerState(world_size=acc.num_processes, total_steps=total)
        reader_state = None
        ckpt = latest_checkpoint(self.work)
        if ckpt is not None:
            restored = load_checkpoint(ckpt, acc, unet=unet, optimizer=optimizer, scheduler=scheduler,
                                       text_encoder=te if cfg.train_text_encoder else None, ema=ema)
            state, reader_state = restored.state, restored.reader_state
            state.total_steps = total
            log.info("resuming from %s (step %d of %d)", ckpt.name, state.step, total)
            self.emit({"event": "resume", "step": state.step, "checkpoint": ckpt.name})
        # The start of the run's first attempt (kept in every checkpoint): ss_training_started_at.
        state.extra.setdefault("training_started_at", time.time())
        if self.main:
            self._prepare_exports(state)
        history = History(self.work / HISTORY_JSONL, state.step) if self.main else None
        tb = self._tensorboard(state.step) if self.main else None
        if self.main and cfg.logging.wandb:
            self._wandb_init()

        prompt_opts = PromptOptions(max_chunks=cfg.max_chunks, caption_dropout=cfg.caption_dropout,
                                    tag_dropout=cfg.tag_dropout, shuffle_general=cfg.shuffle_general)
        pin = self.device.type == "cuda"

        def prepare(epoch: int, batch: dict, rstate: Any) -> StepBatch:
            b = prepare_batch(batch, epoch=epoch, seed=cfg.seed, objective=objective,
                              scaling_factor=manifest.scaling_factor, prompts=prompt_opts,
                              holdout_fraction=cfg.validation.fraction, reader_state=rstate)
            return b.pin() if pin else b

        start_epoch = state.epoch if reader_state is not None else 0
        prefetch = Prefetcher(epoch_stream(reader, start_epoch, reader_state), prepare, depth=cfg.prefetch)
        heldout = self._heldout(store) if self.main else []
        kill_at = int(os.environ.get(KILL_ENV, "0") or 0)
        self.emit({"event": "start", "total_steps": total, "steps_per_epoch": spe, "world_size": acc.num_processes,
                   "device": str(self.device)})
        from tasks.train.export import epoch_export_due

        val: dict[str, float] = {}
        last_reader_state = reader_state
        talk = StepTalk(total, state.step, spe, cfg.grad_accum, float(os.environ.get(TALK_ENV) or TALK_EVERY_S),
                        state.samples_seen) if self.main else None
        window_t0 = time.perf_counter()
        window_wait = 0.0
        window_extra = 0.0
        win_samples = 0
        try:
            while state.step < total:
                wait = 0.0
                for _ in range(cfg.grad_accum):
                    b, waited = prefetch.next()
                    wait += waited
                    engine.micro_step(b)
                    last_reader_state = b.reader_state
                    state.epoch = b.epoch
                out = engine.optimizer_step()
                state.step += 1
                state.micro_batches += cfg.grad_accum
                n_samples = cfg.grad_accum * cfg.batch_size * acc.num_processes
                state.samples_seen += n_samples
                win_samples += n_samples
                window_wait += wait
                if out.applied:
                    state.consecutive_bad = 0
                else:
                    state.skipped_steps += 1
                    state.consecutive_bad += 1
                    log.warning("step %d: non-finite loss/gradients (loss %s, grad norm %s): update skipped",
                                state.step, out.loss, out.grad_norm)
                    if state.consecutive_bad >= cfg.nan_tolerance:
                        raise StageError(nan_stop_message(self.work, state.step, state.consecutive_bad,
                                                          cfg.nan_tolerance))
                final = state.step == total
                if talk is not None and (line := talk.update(state.step, state.micro_batches, cfg.grad_accum, out.loss,
                                                             scheduler.get_last_lr()[0], state.samples_seen)):
                    self.emit(line)
                if state.step % cfg.logging.every == 0 or final:
                    dt = time.perf_counter() - window_t0 - window_extra  # training time only
                    row = {"step": state.step, "epoch": state.epoch, "loss": out.loss,
                           "lr": scheduler.get_last_lr()[0], "grad_norm": out.grad_norm,
                           "samples_per_s": win_samples / dt if dt > 0 else 0.0,
                           "data_wait_frac": window_wait / dt if dt > 0 else 0.0,
                           "skipped_steps": state.skipped_steps}
                    if self.device.type == "cuda":
                        row["gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                    self._log_row(history, tb, row)
                    self.emit({"event": "progress", "fraction": state.step / total, **row, "total_steps": total})
                    window_t0, window_wait, win_samples, window_extra = time.perf_counter(), 0.0, 0, 0.0
                t_extra = time.perf_counter()
                if heldout and ((cfg.validation.every and state.step % cfg.validation.every == 0) or final):
                    val = self._validate(heldout)
                    self._log_row(history, tb, {"step": state.step, "epoch": state.epoch, **val})
                if cfg.sampling.prompts and ((cfg.sampling.every and state.step % cfg.sampling.every == 0) or final):
                    path = self._samples(state.step)
                    if path:
                        self.emit({"event": "samples", "step": state.step, "path": path})
                epoch_done = epoch_export_due(state.micro_batches, cfg.grad_accum, spe, cfg.export_every_epochs)
                if self.main and epoch_done is not None and not final:  # the last epoch is the final export
                    self._export_epoch(state, epoch_done)
                if state.step % cfg.checkpoint_every == 0 or final:
                    save_checkpoint(self.work, acc, state, unet=unet, optimizer=optimizer, scheduler=scheduler,
                                    reader_state=last_reader_state,
                                    text_encoder=te if cfg.train_text_encoder else None, ema=ema,
                                    keep_last=cfg.keep_last)
                window_extra += time.perf_counter() - t_extra  # validation, samples, checkpoints
                if kill_at and state.step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
        finally:
            prefetch.close()
            if tb is not None:
                tb.close()
        result = self._finish(state, val, history, time.time() - t_start)
        return result

    # ------------------------------------------------------------------------------ pieces
    def _tensorboard(self, resume_step: int):
        if not self.cfg.logging.tensorboard:
            return None
        from tasks.train.tb import open_writer

        # Killed attempts logged steps past the checkpoint: drop them, or TensorBoard shows them twice.
        return open_writer(self.work / "tb", resume_step)

    def _wandb_init(self) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise ConfigError("train.logging.wandb=true needs the wandb package (pip install wandb), "
                              "or set train.logging.wandb=false") from exc
        # A stable run id per work folder: a resumed run continues the same wandb run.
        wandb.init(project=self.cfg.logging.wandb_project, id=f"booruflow-{self.work.name}", resume="allow",
                   dir=str(self.work), config=self.cfg.model_dump(mode="json"))

    def _log_row(self, history: History | None, tb, row: dict[str, Any]) -> None:
        if history is None:
            return
        history.append(row)
        if tb is not None:
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)) and math.isfinite(v):
                    tb.add_scalar(f"train/{k}" if not k.startswith("val") else f"val/{k}", v, row["step"])
            tb.flush()
        if self.cfg.logging.wandb:
            import wandb

            wandb.log(row, step=row["step"])

    def _heldout(self, store: ArtifactStore) -> list[dict[str, Any]]:
        from tasks.train.validation import load_heldout

        v = self.cfg.validation
        return load_heldout(self.manifest, store, v.fraction, v.max_samples)

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # .forward: the eager path, so sampling/validation shapes never trigger torch.compile.
        return self.unet_module.forward(x, t, encoder_hidden_states=ctx, return_dict=False)[0]

    def _encode(self, ids: torch.Tensor) -> torch.Tensor:
        return encode_prompts(self.te_module, self.te_module, ids.to(self.device), self.cfg.clip_skip)

    def _validate(self, heldout) -> dict[str, float]:
        from tasks.train.validation import validation_loss

        v = self.cfg.validation
        self.unet_module.eval()
        try:
            return validation_loss(heldout, denoise=self._denoise, encode=self._encode, objective=self.objective,
                                   sigmas=v.sigmas, scaling_factor=self.manifest.scaling_factor,
                                   max_chunks=self.cfg.max_chunks, batch_size=v.batch_size, device=self.device,
                                   autocast=self.acc.autocast)
        finally:
            self.unet_module.train()

    @torch.no_grad()
    def _samples(self, step: int) -> str | None:
        """Rank 0 renders the grid (rows: prompts, columns: seeds); other ranks wait."""
        path = None
        if self.main:
            from tasks.models.text_encode import pad_chunks, pack_batch
            from tasks.models.tokenizer import tokenize_text
            from tasks.models.vae import decode_latents
            from tasks.train.sampling import save_grid, seeded_noise, to_uint8

            s = self.cfg.sampling
            tok = self.comps.tokenizer
            self.unet_module.eval()
            images = []
            try:
                uncond_ids = pack_batch([tokenize_text(tok, s.negative_prompt)] * len(s.seeds), self.cfg.max_chunks)
                for prompt in s.prompts:
                    cond_ids = pack_batch([tokenize_text(tok, prompt)] * len(s.seeds), self.cfg.max_chunks)
                    c_ids, u_ids = pad_chunks(cond_ids, uncond_ids)
                    with self.acc.autocast():
                        cond, uncond = self._encode(c_ids), self._encode(u_ids)
                        noise = seeded_noise(s.seeds, (4, s.height // 8, s.width // 8)).to(self.device)
                        lat = self.objective.sample(self._denoise, noise, cond, uncond, steps=s.steps,
                                                    shift=s.shift, cfg_scale=s.cfg_scale)
                    # The VAE decodes in its own dtype (fp32), outside autocast: SD VAEs are prone to overflow
                    # in half precision, and it is a few images.
                    pixels = decode_latents(self.comps.vae, lat)
                    images.append(to_uint8(pixels))
            finally:
                self.unet_module.train()
            import numpy as np

            rel = f"samples/step-{step:08d}.png"
            save_grid(np.concatenate(images), self.work / rel, cols=len(s.seeds), prompts=s.prompts, seeds=s.seeds)
            path = rel
        self.acc.wait_for_everyone()
        return path

    def _export_unet(self):
        """A clean CPU copy of the UNet (EMA weights when asked) in the export dtype, contiguous."""
        from diffusers import UNet2DConditionModel

        sd = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.unet_module.state_dict().items()}
        if self.ema is not None and self.cfg.ema.export:
            names = [n for n, p in self.unet_module.named_parameters() if p.requires_grad]
            for n, shadow in zip(names, self.ema.shadow):
                sd[n] = shadow.detach().to("cpu").contiguous()
        fresh = UNet2DConditionModel.from_config(self.unet_module.config)
        fresh.load_state_dict(sd, strict=True)
        return fresh.eval()

    # ------------------------------------------------------------------------------ exports
    @property
    def run_name(self) -> str:
        from tasks.train.export import resolve_run_name

        return resolve_run_name(self.cfg, None)  # the stage resolved the default into the config already

    def _prepare_exports(self, state: TrainerState) -> None:
        """Before training (main process): drop what a killed attempt left half-written or made after the
        checkpoint this run resumes from; the resumed run writes those again, once."""
        from tasks.train import export as ex

        ex.clean_export_temps(self.work)
        (self.work / ex.final_export_name(self.run_name)).unlink(missing_ok=True)  # _finish writes it anew
        done = state.micro_batches // max(1, self.spe)
        for path in ex.drop_epoch_exports_after(self.work, self.run_name, done):
            log.info("dropped %s: the killed attempt wrote it after checkpoint step %d; it is made again",
                     path.name, state.step)
        ex.refresh_latest(self.work, self.run_name)

    def _dataset(self):
        """What the exports' ss_* keys say about the data (read once, at the first export)."""
        from tasks.train.export import dataset_summary

        if self._data is None:
            self._data = dataset_summary(self.manifest, self.store, self.cfg.validation.fraction)
        return self._data

    def _metadata(self, state: TrainerState, epoch: int) -> dict[str, str]:
        """The same header for every export of the run: booruflow.*, kohya ss_*, modelspec.*."""
        from tasks.train.export import RunFacts, checkpoint_metadata, kohya_metadata

        cfg = self.cfg
        facts = RunFacts(run_name=self.run_name, started_at=float(state.extra["training_started_at"]), epoch=epoch,
                         num_epochs=max(1, math.ceil(self.total * cfg.grad_accum / max(1, self.spe))),
                         steps=state.step, max_steps=self.total, world_size=self.acc.num_processes,
                         base_model=cfg.model, base_identity=self.source.identity)
        meta = kohya_metadata(cfg, facts, self._dataset())
        meta.update(checkpoint_metadata(cfg.objective, cfg.recommended_shift, base_identity=self.source.identity,
                                        train_shift=cfg.shift, steps=state.step,
                                        extra={"booruflow.ema": str(bool(self.ema is not None and cfg.ema.export))}))
        return meta

    def _export_epoch(self, state: TrainerState, epoch: int) -> None:
        """`<run>-e0003.safetensors` at an epoch end (main process; the live models are only read)."""
        from tasks.models.single_file import export_single_file
        from tasks.train import export as ex

        t0 = time.perf_counter()
        name = ex.epoch_export_name(self.run_name, epoch)
        export_single_file(self._export_unet(), self.comps.vae, self.te_module, self.work / name,
                           dtype=ex.DTYPES[self.cfg.export_dtype], metadata=self._metadata(state, epoch))
        ex.prune_epoch_exports(self.work, self.run_name, self.cfg.keep_exports)
        ex.refresh_latest(self.work, self.run_name)
        self.emit({"event": "export", "epoch": epoch, "step": state.step, "path": name,
                   "seconds": time.perf_counter() - t0})

    def _finish(self, state: TrainerState, val: dict[str, float], history, wall: float
                ) -> dict[str, Any]:
        from tasks.train.export import DTYPES, LATEST, export_index, export_model, final_export_name, refresh_latest

        cfg = self.cfg
        result: dict[str, Any] = {}
        if self.main:
            dtype = DTYPES[cfg.export_dtype]
            meta = self._metadata(state, state.epoch + 1)  # before the models move to the CPU
            unet = self._export_unet().to(dtype)
            te = self.te_module
            if cfg.train_text_encoder:
                te = type(te)(te.config)
                te.load_state_dict({k: v.detach().cpu() for k, v in self.te_module.state_dict().items()})
            te = te.to("cpu", dtype)
            vae = self.comps.vae.to("cpu", dtype)
            written = export_model(self.work, unet=unet, vae=vae, text_encoder=te, tokenizer=self.comps.tokenizer,
                                   objective=cfg.objective, dtype=cfg.export_dtype,
                                   recommended_shift=cfg.recommended_shift, metadata=meta,
                                   diffusers=cfg.export_diffusers, filename=final_export_name(self.run_name))
            latest = refresh_latest(self.work, self.run_name)
            rows = [r for r in history.rows if "loss" in r] if history else []
            if not val and history:
                val = next((r for r in reversed(history.rows) if "val_loss" in r), {})
                val = {k: v for k, v in val.items() if k.startswith("val_")}
            speeds = [r["samples_per_s"] for r in rows if r.get("samples_per_s")]
            waits = [r["data_wait_frac"] for r in rows if r.get("data_wait_frac") is not None]
            result = {
                "objective": cfg.objective, "base_model_identity": self.source.identity, "steps": state.step,
                "epochs": state.epoch + 1, "samples_seen": state.samples_seen, "skipped_steps": state.skipped_steps,
                "world_size": self.acc.num_processes, "wall_s": wall,
                "mean_samples_per_s": sum(speeds) / len(speeds) if speeds else None,
                "mean_data_wait_frac": sum(waits) / len(waits) if waits else None,
                "final_loss": rows[-1]["loss"] if rows else None, "validation": val,
                # every grid in the folder: a resumed run keeps the grids rendered before the kill
                "samples": sorted(p.relative_to(self.work).as_posix() for p in (self.work / "samples").glob("*.png")),
                "recommended_shift": cfg.recommended_shift if self.objective.prediction == "flow" else None,
                "run_name": self.run_name, "exports": export_index(self.work, self.run_name),
                "latest": LATEST if latest else None,
                **written,
            }
            atomic_write_text(self.work / RESULT_NAME, json.dumps(result, indent=1))
            self.emit({"event": "done", **result})
        self.acc.wait_for_everyone()
        return result
