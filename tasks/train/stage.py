"""The train stage: cache chunks -> fine-tuned SD1.5 (single file + diffusers folder), samples, history.

Resumable: the work folder keeps the training checkpoints across kills, so a rerun continues at the exact
next batch. The committed output holds the exports (`<run>.safetensors`, with train.export_every_epochs
also `<run>-e0003.safetensors` per epoch, and the link `latest.safetensors`), the diffusers folder, the
sample grids, history.parquet, the TensorBoard logs and (only with train.keep_checkpoint_in_output) the
last training checkpoint. Everything in it is readable by other users (a ComfyUI service).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from data_contracts.tables import rows_to_table, write_table
from data_contracts.train import HISTORY_SCHEMA
from pipeline_config.schema import PipelineConfig
from tasks.common.pictures import draw_pictures
from tasks.common.stage import StageContext, StageReport, StageResult, StageSpec
from tasks.diffusion.objectives import objective_named
from tasks.models.single_file import make_tree_readable
from tasks.train.checkpoint import checkpoint_root
from tasks.train.export import LATEST, clean_export_temps, resolve_run_name
from tasks.train.launch import duration, event_line, launch, tensorboard_hint
from tasks.train.loop import HISTORY_JSONL, RESULT_NAME, RunSpec
from tasks.train.visuals import make_train_curves, report_table_rows

CODE_VERSION = "2"  # 2: exports named <run>.safetensors / <run>-e0003.safetensors, ss_* metadata, 0644
RUN_FILE = "run.json"


def history_table_rows(jsonl: Path) -> list[dict[str, Any]]:
    """One row per logged step (training metrics and validation merged), in step order."""
    by_step: dict[int, dict[str, Any]] = {}
    if jsonl.exists():
        for line in jsonl.read_text().splitlines():
            row = json.loads(line)
            by_step.setdefault(int(row["step"]), {}).update(row)
    names = HISTORY_SCHEMA.names
    return [{k: by_step[s].get(k) for k in names} for s in sorted(by_step)]


def _summary(result: dict[str, Any], cfg) -> str:
    val = result.get("validation") or {}
    speed = result.get("mean_samples_per_s")
    wait = result.get("mean_data_wait_frac")
    lines = [
        f"### Train: {result['objective']} objective, {result['steps']} optimiser steps, {result['world_size']} process(es)",
        f"- base model `{result['base_model_identity'][:16]}`, {result['samples_seen']} samples seen, "
        f"{result['skipped_steps']} non-finite steps skipped",
        f"- final loss {result['final_loss']:.4f}" if result.get("final_loss") is not None else "- no loss logged",
        f"- held-out loss {val['val_loss']:.4f} over σ grid {cfg.validation.sigmas}" if "val_loss" in val else
        "- no held-out samples (train.validation.fraction = 0 or too little data)",
        f"- throughput {speed:.1f} samples/s, data wait {100 * (wait or 0):.1f} %" if speed else "",
        f"- checkpoint `{result['checkpoint']}`" + (f", diffusers folder `{result['diffusers_dir']}`"
                                                    if result.get("diffusers_dir") else "")
        + (f", `{result['latest']}` links to it" if result.get("latest") else ""),
        _exports_line(result.get("exports") or []),
    ]
    lines.append("- " + objective_named(result["objective"])().usage(result.get("recommended_shift") or 3.0))
    return "\n".join(l for l in lines if l)


def _exports_line(exports: list[dict[str, Any]]) -> str:
    if not exports:
        return ""
    names = ", ".join(f"`{e['path']}`" for e in exports)
    return f"- epoch exports (try them in ComfyUI): {names}"


def run_name(cfg: PipelineConfig) -> str:
    """The export name this config gives (train.run_name, else booruflow-<config name>)."""
    return resolve_run_name(cfg.train, cfg.name)


def fingerprint_extra(cfg: PipelineConfig) -> dict[str, Any]:
    # The default name comes from the config's name, outside the train section: an output holds its files
    # under that name, so another name is another output.
    return {"run_name": run_name(cfg)}


def build(ctx: StageContext) -> StageResult:
    cfg = ctx.section
    cache = ctx.upstream["cache"]
    train = {**cfg.model_dump(mode="json"), "run_name": run_name(ctx.cfg)}
    spec = RunSpec(train=train, work=str(ctx.work), data_root=ctx.store.root_url,
                   local_cache=str(ctx.store.local_cache), cache_fingerprint=cache.fingerprint,
                   model_cache_dir=str(ctx.cfg.runtime.cache_dir), device=ctx.cfg.runtime.device)

    def on_event(event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "progress":
            ctx.progress(float(event["fraction"]) * 0.95,
                         f"step {event['step']}/{event['total_steps']} loss {event['loss']:.4f} "
                         f"{event['samples_per_s']:.1f} samples/s")
        elif kind == "step":
            ctx.progress(int(event["step"]) / max(1, int(event["total_steps"])) * 0.95,
                         f"step {event['step']}/{event['total_steps']}, ETA {duration(event.get('eta_s'))}")
        elif kind == "export":
            ctx.log.info("train: epoch %s exported after step %s: %s (%.1fs)", event["epoch"], event["step"],
                         ctx.work / event["path"], float(event.get("seconds") or 0.0))
        line = event_line(event)  # readable lines in the log, never raw JSON
        if line:
            ctx.log.info("%s", line)

    done = ctx.work / RESULT_NAME
    if done.exists():  # trained and exported before a kill: only the bookkeeping below is left
        result = json.loads(done.read_text())
        spec.save(ctx.work / RUN_FILE)  # the committed copy names its own folder, never the work folder
    else:
        if cfg.logging.tensorboard:
            ctx.log.info("train: watch it live: %s (after the run: %s/tb)", tensorboard_hint(ctx.work / "tb"),
                         ctx.store.output_path("train", ctx.fingerprint))
        if cfg.accelerate_config:  # multi-node: the other machines join with the same run file
            ctx.log.info("train: multi-node run: on every other machine run `fm train-node %s --accelerate-config "
                         "<that machine's config>`", ctx.work / RUN_FILE)
        result = launch(spec, ctx.work / RUN_FILE, launcher=cfg.launcher, num_processes=cfg.num_processes,
                        accelerate_config=cfg.accelerate_config, port=cfg.main_process_port,
                        on_line=lambda line: ctx.log.info("%s", line), on_event=on_event)
    ctx.progress(0.97, "writing history")
    rows = history_table_rows(ctx.work / HISTORY_JSONL)
    history = rows_to_table(rows, HISTORY_SCHEMA)
    write_table(history, ctx.work / "history.parquet", HISTORY_SCHEMA)
    curves, note = draw_pictures(ctx, {"training curves": lambda: make_train_curves(history, ctx.work)})
    if not cfg.keep_checkpoint_in_output:
        shutil.rmtree(checkpoint_root(ctx.work), ignore_errors=True)
    clean_export_temps(ctx.work)  # a kill's leftovers would be unlisted files in the output
    if not ctx.store.is_local:  # object storage has no links: the upload would be a second full copy
        (ctx.work / LATEST).unlink(missing_ok=True)
        result["latest"] = None
    make_tree_readable(ctx.work)  # 0644 / 0755 under umask 022: the output folder is this folder renamed
    report = StageReport(
        summary_md=_summary(result, cfg) + note,
        tables={"history": report_table_rows([r for r in rows if r.get("loss") is not None][-50:]),
                "validation": report_table_rows([{"metric": k, "value": v}
                                                 for k, v in (result.get("validation") or {}).items()])},
        images={**curves, **{f"samples at {Path(p).stem}": p for p in result.get("samples", [])}},
    )
    stats = {k: result.get(k) for k in ("samples_seen", "skipped_steps", "world_size", "wall_s",
                                         "mean_samples_per_s", "mean_data_wait_frac", "final_loss")}
    stats["validation"] = result.get("validation") or {}
    stats["run_name"] = result.get("run_name")
    stats["exports"] = result.get("exports") or []  # [{epoch, step, path}] of the epoch exports kept
    return StageResult(
        row_counts={"history": len(rows)},
        stats=stats,
        manifest_fields={
            "objective": result["objective"], "base_model_identity": result["base_model_identity"],
            "steps": result["steps"], "epochs": result["epochs"], "checkpoint": result["checkpoint"],
            "diffusers_dir": result.get("diffusers_dir"), "recommended_shift": result.get("recommended_shift"),
            "samples": result.get("samples", []), "phase": ctx.cfg.train.phase,
        },
        report=report,
    )


SPEC = StageSpec(name="train", upstream=("cache",), code_version=CODE_VERSION, build=build, resumable=True,
                 gpu=True, fingerprint_extra=fingerprint_extra)
