"""Export the fine-tuned model: single-file SD1.5 checkpoints (final and per epoch) and a diffusers folder.

A single file carries no key that makes ComfyUI / Forge / diffusers pick flow sampling, so the objective and
the recommended inference shift go into the safetensors metadata for people and tools to read
(ComfyUI: ModelSamplingSD3 with that shift; diffusers: FlowMatchEulerDiscreteScheduler(shift=...)). The
diffusers folder ships that scheduler config, so `StableDiffusionPipeline.from_pretrained` samples with
flow out of the box (set `pipe.scheduler.init_noise_sigma = 1.0` on diffusers versions that need it).

Names follow kohya's habits (what ComfyUI/A1111 users expect to find): `<run>.safetensors` is the final
model, `<run>-e0003.safetensors` the export after epoch 3, `latest.safetensors` a relative symlink to the
newest of them. Every export also carries kohya's `ss_*` keys (dataset, buckets, tag frequencies, the
training settings) and `modelspec.*`, which model browsers and metadata viewers read.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from data_contracts.errors import ConfigError
from tasks.diffusion.objectives import objective_named
from tasks.models.load import SD15Components, save_diffusers_folder
from tasks.models.single_file import export_single_file, make_tree_readable, read_metadata

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SUFFIX = ".safetensors"
LATEST = "latest" + SUFFIX
TOP_TAGS = 500  # ss_tag_frequency keeps the most frequent tags only: the header stays small (~15 KB)
# Temp names of export_single_file (`.<name>.<pid>.tmp`, its header rewrite `....tmp.canon`) and of point_latest.
TEMP_NAME = re.compile(r"\..+\.safetensors\.\d+\.(tmp|tmp\.canon|link)")
OPTIMIZER_NAMES = {"adamw8bit": "bitsandbytes.optim.AdamW8bit", "adamw": "torch.optim.AdamW"}


# ------------------------------------------------------------------------------------------------ names

def default_run_name(config_name: str | None) -> str:
    """`booruflow-<config name>` (booruflow-nai-v2-fm, booruflow-demo): the preset is what a user calls a run."""
    slug = re.sub(r"[^A-Za-z0-9._+-]+", "-", (config_name or "").strip()).strip("-.")
    return f"booruflow-{slug}" if slug else "booruflow"


def resolve_run_name(train_cfg: Any, config_name: str | None) -> str:
    name = getattr(train_cfg, "run_name", None) or default_run_name(config_name)
    if name + SUFFIX == LATEST:  # would collide with the link to the newest export
        raise ConfigError("train.run_name='latest' is reserved for latest.safetensors: choose another name")
    return name


def final_export_name(run_name: str) -> str:
    return run_name + SUFFIX


def epoch_export_name(run_name: str, epoch: int) -> str:
    return f"{run_name}-e{epoch:04d}{SUFFIX}"


def export_epoch(run_name: str, filename: str) -> int | None:
    """The epoch of an epoch export of this run (`<run>-e0003.safetensors` -> 3); None for other files."""
    m = re.fullmatch(re.escape(run_name) + r"-e(\d{4,})" + re.escape(SUFFIX), filename)
    return int(m.group(1)) if m else None


def epoch_exports(folder: Path, run_name: str) -> list[tuple[int, Path]]:
    """This run's epoch exports in `folder`, oldest epoch first."""
    found = [(e, p) for p in Path(folder).glob(f"{run_name}-e*{SUFFIX}")
             if p.is_file() and not p.is_symlink() and (e := export_epoch(run_name, p.name)) is not None]
    return sorted(found)


def epochs_ended(micro_batches: int, grad_accum: int, steps_per_epoch: int) -> list[int]:
    """Epochs (1-based) whose last micro-batch went into the optimiser step that ended at `micro_batches`."""
    spe = max(1, steps_per_epoch)
    return list(range((micro_batches - grad_accum) // spe + 1, micro_batches // spe + 1))


def epoch_export_due(micro_batches: int, grad_accum: int, steps_per_epoch: int, every: int) -> int | None:
    """The epoch to export after this optimiser step (the newest that ended, when one of those that ended
    is a multiple of `every`), else None."""
    ended = epochs_ended(micro_batches, grad_accum, steps_per_epoch)
    if every <= 0 or not any(e % every == 0 for e in ended):
        return None
    return ended[-1]


# ------------------------------------------------------------------------------- files in the folder

def point_latest(folder: Path, target: str | None) -> bool:
    """Make `latest.safetensors` a relative symlink to `target` (a file in the same folder), atomically;
    remove it for None. False where the filesystem has no symlinks (then there is no `latest`)."""
    link = Path(folder) / LATEST
    if target is None:
        link.unlink(missing_ok=True)
        return False
    tmp = link.with_name(f".{LATEST}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(target, tmp)  # relative: survives the rename of the work folder into the output
    except OSError:
        return False
    os.replace(tmp, link)
    return True


def prune_epoch_exports(folder: Path, run_name: str, keep: int) -> list[Path]:
    """Delete all but the newest `keep` epoch exports (0 = keep all); the removed paths."""
    found = epoch_exports(folder, run_name)
    gone = [p for _, p in found[:-keep]] if keep > 0 else []
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


def drop_epoch_exports_after(folder: Path, run_name: str, epoch: int) -> list[Path]:
    """A resumed run replays from its checkpoint: exports of epochs after it are from the killed attempt and
    will be written again, so they go now (never two versions, never one the resumed run did not make)."""
    gone = [p for e, p in epoch_exports(folder, run_name) if e > epoch]
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


def clean_export_temps(folder: Path) -> list[Path]:
    """Temp files of exports a kill interrupted (`.<name>.safetensors.<pid>.tmp`, `.latest...link`)."""
    gone = [p for p in Path(folder).glob(".*") if TEMP_NAME.fullmatch(p.name) and (p.is_file() or p.is_symlink())]
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


def refresh_latest(folder: Path, run_name: str) -> str | None:
    """Point `latest` at the final export when there is one, else at the newest epoch export; the file it
    names (None: no export yet, or no symlinks here)."""
    final = Path(folder) / final_export_name(run_name)
    found = epoch_exports(folder, run_name)
    target = final.name if final.is_file() else (found[-1][1].name if found else None)
    return target if point_latest(folder, target) else None


def export_index(folder: Path, run_name: str) -> list[dict[str, Any]]:
    """The epoch exports left in `folder`: epoch, optimiser step (from each file's header) and name."""
    out = []
    for epoch, path in epoch_exports(folder, run_name):
        meta = read_metadata(path)
        out.append({"epoch": epoch, "step": int(meta.get("ss_steps", 0) or 0), "path": path.name})
    return out


# ---------------------------------------------------------------------------------------- dataset

@dataclass
class DatasetSummary:
    """What the train stage trained on (held-out validation rows excluded), for the ss_* keys."""

    name: str  # a dataset "folder" name, as kohya writes one per image directory
    images: int = 0
    buckets: dict[tuple[int, int], int] = field(default_factory=dict)
    tags: Counter = field(default_factory=Counter)


def summarise_rows(name: str, ids: list[int], sizes: list[tuple[int, int]], tags: list[list[str]],
                   keep: Any, into: DatasetSummary | None = None) -> DatasetSummary:
    """Count the rows `keep(id)` accepts: per bucket, and each caption tag once per image."""
    out = into if into is not None else DatasetSummary(name=name)
    for sid, size, row_tags in zip(ids, sizes, tags):
        if not keep(sid):
            continue
        out.images += 1
        out.buckets[size] = out.buckets.get(size, 0) + 1
        out.tags.update({t for t in row_tags if t})  # a tag counts once per image
    return out


def dataset_summary(manifest: Any, store: Any, holdout_fraction: float) -> DatasetSummary:
    """Read ids, bucket sizes and caption tags (`tags_<segment>`, as the prompts render them) of the cache
    output, a chunk at a time (only those columns; the chunks are local once the first epoch read them)."""
    import pyarrow.parquet as pq

    from data_contracts.cache import SEGMENTS
    from tasks.train.batches import is_heldout

    cols = ["id", "bucket_w", "bucket_h"] + [f"tags_{s}" for s in SEGMENTS]
    out = DatasetSummary(name=f"cache-{manifest.fingerprint[:8]}")
    for chunk in manifest.chunks:
        data = pq.read_table(store.path(manifest, chunk.path), columns=cols).to_pydict()
        tags = [[t for s in SEGMENTS for t in (data[f"tags_{s}"][i] or [])] for i in range(len(data["id"]))]
        summarise_rows(out.name, data["id"], list(zip(data["bucket_w"], data["bucket_h"])), tags,
                       keep=lambda sid: not is_heldout(sid, holdout_fraction), into=out)
    return out


def base_resolution(buckets: dict[tuple[int, int], int], step: int = 64) -> int:
    """The square side of the bucket area (512 for kohya's 512² buckets), from the largest bucket."""
    if not buckets:
        return 0
    area = max(w * h for w, h in buckets)
    return max(step, int(math.isqrt(area) // step * step))


def bucket_info(buckets: dict[tuple[int, int], int]) -> dict[str, Any]:
    """kohya's ss_bucket_info shape: {"buckets": {"0": {"resolution": [w, h], "count": n}, ...}}."""
    ordered = sorted(buckets.items(), key=lambda kv: (kv[0][0] / kv[0][1], kv[0]))
    return {"buckets": {str(i): {"resolution": [w, h], "count": n} for i, ((w, h), n) in enumerate(ordered)}}


def top_tags(tags: Counter, n: int = TOP_TAGS) -> dict[str, int]:
    """The n most frequent tags, most frequent first (ties by name, so equal data gives equal headers)."""
    return dict(sorted(tags.items(), key=lambda kv: (-kv[1], kv[0]))[:n])


# --------------------------------------------------------------------------------------- metadata

def checkpoint_metadata(objective: str, recommended_shift: float, *, base_identity: str, train_shift: float,
                        steps: int, extra: dict[str, Any] | None = None) -> dict[str, str]:
    """booruflow.* and modelspec.* keys; what they say about the objective comes from the objective itself."""
    meta = {
        "booruflow.objective": objective,
        "booruflow.train_shift": f"{train_shift:g}",
        "booruflow.base_model": base_identity,
        "booruflow.steps": str(steps),
        "modelspec.architecture": "stable-diffusion-v1",
        **objective_named(objective)().metadata(recommended_shift),
    }
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    return meta


def optimizer_description(cfg: Any) -> str:
    """kohya's ss_optimizer form: the class, then its non-default arguments."""
    args = f"weight_decay={cfg.weight_decay:g},betas={tuple(cfg.betas)},eps={cfg.eps:g}"
    return f"{OPTIMIZER_NAMES.get(cfg.optimizer, cfg.optimizer)}({args})"


@dataclass
class RunFacts:
    """Facts of the training run an export's header records (the config is the rest)."""

    run_name: str
    started_at: float  # unix time the run (its first attempt) started
    epoch: int  # epochs completed (the final export: epochs touched)
    num_epochs: int  # epochs the run plans
    steps: int  # optimiser steps done
    max_steps: int
    world_size: int
    base_model: str  # the train.model spec
    base_identity: str  # sha256 of the base weights
    finished_at: float = field(default_factory=time.time)


def kohya_metadata(cfg: Any, facts: RunFacts, data: DatasetSummary) -> dict[str, str]:
    """kohya sd-scripts' ss_* keys (train_network.py / fine_tune.py) and SAI modelspec, as strings.

    Wall-clock keys (ss_training_started_at / finished_at, ss_session_id, modelspec.date) are left out on purpose:
    the same training gives the same file, byte for byte, so a rerun's export keeps its sha256 and downstream
    stages stay cached (data_contracts.fingerprint.content_id)."""
    res = base_resolution(data.buckets)
    meta: dict[str, Any] = {
        "ss_output_name": facts.run_name,
        "ss_num_train_images": data.images,
        "ss_num_reg_images": 0,
        "ss_num_epochs": facts.num_epochs,
        "ss_epoch": facts.epoch,
        "ss_steps": facts.steps,
        "ss_max_train_steps": facts.max_steps,
        "ss_learning_rate": cfg.lr,
        "ss_unet_lr": cfg.lr,
        "ss_text_encoder_lr": cfg.text_encoder_lr if cfg.train_text_encoder else None,
        "ss_lr_scheduler": "constant_with_warmup" if cfg.warmup > 0 else "constant",
        "ss_lr_warmup_steps": round(cfg.warmup * facts.max_steps),
        "ss_batch_size_per_device": cfg.batch_size,
        "ss_total_batch_size": cfg.batch_size * cfg.grad_accum * facts.world_size,
        "ss_gradient_accumulation_steps": cfg.grad_accum,
        "ss_gradient_checkpointing": cfg.gradient_checkpointing,
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_full_fp16": False,
        "ss_optimizer": optimizer_description(cfg),
        "ss_max_grad_norm": cfg.max_grad_norm,
        "ss_resolution": f"({res}, {res})",
        "ss_enable_bucket": True,
        "ss_bucket_info": json.dumps(bucket_info(data.buckets)),
        "ss_tag_frequency": json.dumps({data.name: top_tags(data.tags)}, ensure_ascii=False),
        "ss_dataset_dirs": json.dumps({data.name: {"n_repeats": 1, "img_count": data.images}}),
        "ss_cache_latents": True,
        "ss_shuffle_caption": cfg.shuffle_general,
        "ss_caption_dropout_rate": cfg.caption_dropout,
        "ss_caption_tag_dropout_rate": cfg.tag_dropout,
        "ss_max_token_length": 75 * cfg.max_chunks,
        "ss_clip_skip": cfg.clip_skip,
        "ss_seed": cfg.seed,
        "ss_base_model_version": "sd_v1",
        "ss_v2": False,
        "ss_sd_model_name": Path(facts.base_model).name or facts.base_model,
        "ss_new_sd_model_hash": facts.base_identity,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": facts.run_name,
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.encoder_layer": cfg.clip_skip,
    }
    return {k: str(v) for k, v in meta.items()}


# ----------------------------------------------------------------------------------------- writing

def export_model(out_dir: Path, *, unet, vae, text_encoder, tokenizer, objective: str, dtype: str,
                 recommended_shift: float, metadata: dict[str, str], diffusers: bool = True,
                 filename: str = "model.safetensors") -> dict[str, str]:
    """Write `<out_dir>/<filename>` (and `<out_dir>/diffusers/`); returns their paths relative to out_dir.
    Both are readable by other users (0644 files / 0755 folders under the usual umask 022): a ComfyUI
    service runs as another user."""
    out_dir = Path(out_dir)
    export_single_file(unet, vae, text_encoder, out_dir / filename, dtype=DTYPES[dtype], metadata=metadata)
    written = {"checkpoint": filename}
    if diffusers:
        sched = objective_named(objective)().scheduler_config(recommended_shift)
        save_diffusers_folder(SD15Components(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer),
                              out_dir / "diffusers", scheduler_config=sched)
        make_tree_readable(out_dir / "diffusers")  # mkdtemp made it 0700, safetensors 0600
        written["diffusers_dir"] = "diffusers"
    return written
