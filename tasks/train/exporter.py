"""The run's single-file exports, written by rank 0 from the live models: `<run>-e0003.safetensors` at epoch
ends while training, `<run>.safetensors` (and the diffusers folder) at the end. Every export carries the
same header: booruflow.*, kohya ss_*, modelspec.*."""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline_config.train import TrainConfig
from tasks.train import export as ex
from tasks.train.checkpoint import TrainerState

if TYPE_CHECKING:  # parts.py builds the exporter
    from tasks.train.parts import Models

log = logging.getLogger("booruflow.train")


class Exporter:
    def __init__(self, cfg: TrainConfig, work: Path, models: Models, *, manifest: Any, store: Any,
                 steps_per_epoch: int, total: int, world_size: int, emit: Callable[[dict[str, Any]], None]) -> None:
        self.cfg, self.work, self.models, self.manifest, self.store = cfg, work, models, manifest, store
        self.spe, self.total, self.world_size, self.emit = steps_per_epoch, total, world_size, emit
        self.run_name = ex.resolve_run_name(cfg, None)  # the stage resolved the default into the config already

    def prepare(self, state: TrainerState) -> None:
        """Before training (rank 0): drop what a killed attempt left half-written or made after the
        checkpoint this run resumes from; the resumed run writes those again, once."""
        ex.clean_export_temps(self.work)
        (self.work / ex.final_export_name(self.run_name)).unlink(missing_ok=True)  # final() writes it anew
        done = state.micro_batches // max(1, self.spe)
        for path in ex.drop_epoch_exports_after(self.work, self.run_name, done):
            log.info("dropped %s: the killed attempt wrote it after checkpoint step %d; it is made again",
                     path.name, state.step)
        ex.refresh_latest(self.work, self.run_name)

    @cached_property
    def dataset(self) -> ex.DatasetSummary:
        """What the exports' ss_* keys say about the data (read once, at the first export)."""
        return ex.dataset_summary(self.manifest, self.store, self.cfg.validation.fraction)

    def metadata(self, state: TrainerState, epoch: int) -> dict[str, str]:
        cfg, identity = self.cfg, self.models.source.identity
        facts = ex.RunFacts(run_name=self.run_name, started_at=float(state.extra["training_started_at"]),
                            epoch=epoch, num_epochs=max(1, math.ceil(self.total * cfg.grad_accum / max(1, self.spe))),
                            steps=state.step, max_steps=self.total, world_size=self.world_size,
                            base_model=cfg.model, base_identity=identity)
        meta = ex.kohya_metadata(cfg, facts, self.dataset)
        ema = self.models.ema is not None and cfg.ema.export
        meta.update(ex.checkpoint_metadata(cfg.objective, cfg.recommended_shift, base_identity=identity,
                                           train_shift=cfg.shift, steps=state.step,
                                           extra={"booruflow.ema": str(bool(ema))}))
        return meta

    def unet_copy(self):
        """A clean CPU copy of the UNet (EMA weights when asked) in the export dtype, contiguous."""
        from diffusers import UNet2DConditionModel

        live, ema = self.models.unet_module, self.models.ema
        sd = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in live.state_dict().items()}
        if ema is not None and self.cfg.ema.export:
            names = [n for n, p in live.named_parameters() if p.requires_grad]
            for n, shadow in zip(names, ema.shadow):
                sd[n] = shadow.detach().to("cpu").contiguous()
        fresh = UNet2DConditionModel.from_config(live.config)
        fresh.load_state_dict(sd, strict=True)
        return fresh.eval()

    def epoch(self, state: TrainerState, epoch: int) -> None:
        """`<run>-e0003.safetensors` at an epoch end (the live models are only read)."""
        from tasks.models.single_file import export_single_file

        t0 = time.perf_counter()
        name = ex.epoch_export_name(self.run_name, epoch)
        export_single_file(self.unet_copy(), self.models.vae, self.models.te_module, self.work / name,
                           dtype=ex.DTYPES[self.cfg.export_dtype], metadata=self.metadata(state, epoch))
        ex.prune_epoch_exports(self.work, self.run_name, self.cfg.keep_exports)
        ex.refresh_latest(self.work, self.run_name)
        self.emit({"event": "export", "epoch": epoch, "step": state.step, "path": name,
                   "seconds": time.perf_counter() - t0})

    def final(self, state: TrainerState) -> dict[str, Any]:
        """`<run>.safetensors` (+ diffusers/) and the `latest` link; the result keys naming what was written.
        It moves the VAE to the CPU: the last thing the run does with the models."""
        cfg, m = self.cfg, self.models
        dtype = ex.DTYPES[cfg.export_dtype]
        meta = self.metadata(state, state.epoch + 1)  # before the models move to the CPU
        unet = self.unet_copy().to(dtype)
        te = m.te_module
        if cfg.train_text_encoder:
            te = type(te)(te.config)
            te.load_state_dict({k: v.detach().cpu() for k, v in m.te_module.state_dict().items()})
        te = te.to("cpu", dtype)
        vae = m.vae.to("cpu", dtype)
        written = ex.export_model(self.work, unet=unet, vae=vae, text_encoder=te, tokenizer=m.tokenizer,
                                  objective=cfg.objective, dtype=cfg.export_dtype,
                                  recommended_shift=cfg.recommended_shift, metadata=meta,
                                  diffusers=cfg.export_diffusers, filename=ex.final_export_name(self.run_name))
        latest = ex.refresh_latest(self.work, self.run_name)
        return {"run_name": self.run_name, "exports": ex.export_index(self.work, self.run_name),
                "latest": ex.LATEST if latest else None, **written}
