"""The study, start to finish, through the stages: data once, the ε base, the new data, two arms per seed, one
eval per seed, then the statistics and the report (plain functions; flows/study.py runs the same with Prefect).

The caller supplies `run(stage, cfg) -> outcome` (an object with `.manifest` and `.cached`), as for the A/B run
(tasks/eval/ab.py): flows/ runs each stage as a Prefect task, tests pass tasks.common.stage.run_stage bound to a
store. Every stage output is fingerprinted and cached as usual, so a killed study rerun redoes only what is
missing; the study's own output (`<data_root>/study/<fingerprint>/`: report.md, visuals/, study.json written
last) is keyed by the study section and the eval outputs it read, and reused when complete.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from data_contracts.bucket import BUCKETS_SCHEMA, BucketManifest
from data_contracts.eval import EvalManifest
from data_contracts.fingerprint import digest
from data_contracts.ingest import POSTS_SCHEMA, IngestManifest
from data_contracts.store import ArtifactStore, atomic_write_text
from data_contracts.tables import read_table
from data_contracts.tag import TagManifest
from data_contracts.train import TrainManifest
from pipeline_config.schema import PipelineConfig
from tasks.sample.samplers import SAMPLER_LABELS
from tasks.study import plan
from tasks.study.analysis import Analysis, analyse
from tasks.study.collect import Grid, build_grid
from tasks.study.context import ReportContext, RunFacts
from tasks.study.models import (
    codec_model,
    config_param_counts,
    ensure_random_model,
    param_counts,
)
from tasks.study.plots import differences, learning_curves, samples_sheet
from tasks.study.report import placeholder_markdown, study_markdown

STUDY_VERSION = "1"  # bump when the analysis or report changes what a study output holds
DATA_STAGES = ("ingest", "dedup", "tag", "quality")
RESULT_NAME = "study.json"  # written last: a folder without it is incomplete
REPORT_NAME = "report.md"
POINTS_NAME = "points.csv"  # every (arm, step, concept) hit rate with its interval, for one's own plots
DOC_IMAGES = "flow_vs_ddpm"  # docs/flow_vs_ddpm/<picture>.png beside docs/flow_vs_ddpm.md
RunFn = Callable[[str, PipelineConfig], Any]


@dataclass
class StudyResult:
    folder: Path
    fingerprint: str
    cached: bool
    markdown: str
    images: dict[str, str]  # name -> path relative to folder
    runs: list[dict[str, Any]] = field(default_factory=list)  # every stage run: label, stage, fingerprint, cached
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    doc: Path | None = None


# ----------------------------------------------------------------------------------------------- the data

def data_tags(store: ArtifactStore) -> tuple[set[str], set[str]]:
    """Every character and artist tag the ingested posts carry (the set the new phase excludes from)."""
    from tasks.eval.concepts import posts_files

    ingest = store.read_manifest(IngestManifest)
    chars: set[str] = set()
    artists: set[str] = set()
    for rel in posts_files(ingest):
        table = read_table(store.path(ingest, rel), POSTS_SCHEMA, f"ingest/{ingest.fingerprint}/{rel}",
                           columns=["id", "tags_character", "tags_artist"])
        for row in table.to_pylist():
            chars.update(row["tags_character"] or [])
            artists.update(row["tags_artist"] or [])
    return chars, artists


def concept_posts(store: ArtifactStore, buckets: dict[str, BucketManifest]) -> tuple[dict[str, int],
                                                                                    dict[str, dict[str, int]]]:
    """Posts each phase selected ({"base": n, "new": n}) and, per character/artist, how many of them carry it."""
    from tasks.eval.concepts import training_rows

    rows = {r["id"]: r for r in training_rows(store, store.read_manifest(IngestManifest),
                                              store.read_manifest(TagManifest))}
    totals: dict[str, int] = {}
    per: dict[str, dict[str, int]] = {}
    for phase, m in buckets.items():
        ids = read_table(store.path(m, "buckets.parquet"), BUCKETS_SCHEMA, f"bucket/{m.fingerprint}/buckets.parquet",
                         columns=["id"]).column("id").to_pylist()
        totals[phase] = len(ids)
        counts: Counter[str] = Counter()
        for i in ids:
            r = rows.get(i)
            if r is not None:
                counts.update(set(r["character"]) | set(r["artist"]))
        for tag, k in counts.items():
            per.setdefault(tag, {})[phase] = k
    return totals, per


# ------------------------------------------------------------------------------------------ the context

def sampler_text(params: dict[str, str]) -> str:
    """How an arm's images were sampled, from their PNG parameters (what the eval really did)."""
    sampler, steps, cfg = params.get("Sampler", "?"), params.get("Steps", "?"), params.get("CFG scale", "?")
    if params.get("Prediction") == "epsilon":
        return (f"{sampler} over SD1.5's scaled-linear DDPM noise levels (EulerDiscreteScheduler's timesteps: the "
                f"SD1.5 scheduler; ε-prediction, no shift), {steps} steps, CFG {cfg}")
    return (f"{sampler} in flow form (velocity v = ε − x0), FlowMatchEulerDiscreteScheduler σ with shift "
            f"{params.get('Shift', '?')}, {steps} steps, CFG {cfg}")


def _samplers(grid: Grid) -> dict[str, str]:
    from tasks.sample.pngmeta import read_png_info

    out = {}
    for arm in grid.arms:
        path = next((p for (a, _, step, _), p in sorted(grid.samples.items(), key=lambda kv: str(kv[0]))
                     if a == arm and step > 0), None)
        info = read_png_info(path) if path is not None else None
        out[arm] = sampler_text(info.params) if info is not None else "unknown (no sample image)"
    return out


def _facts(label: str, m: TrainManifest) -> RunFacts:
    s = m.stats
    return RunFacts(label, m.fingerprint, m.objective, m.steps, s.get("samples_seen"), s.get("wall_s"),
                    s.get("mean_samples_per_s"))


def _device(cfg: PipelineConfig) -> str:
    try:
        import torch

        if cfg.runtime.device != "cpu" and torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # the device name is a courtesy in the report
        pass
    return "CPU"


def base_context(cfg: PipelineConfig, base: PipelineConfig | None = None, arm: PipelineConfig | None = None
                 ) -> ReportContext:
    """What the configs alone say (the placeholder page has only this): the base's and an arm's config, by
    default as plan.preview_configs derives them."""
    if base is None or arm is None:
        base, arm = plan.preview_configs(cfg)
    study, t, b, e = cfg.study, arm.train, base.train, cfg.eval
    return ReportContext(
        config_name=cfg.name, model=cfg.train.model, resolution=arm.bucket.resolution,
        new_characters=list(study.new_characters), new_artists=list(study.new_artists), seeds=list(study.seeds),
        base_train={"steps": b.max_steps or f"{b.epochs} epochs", "batch": b.batch_size * b.grad_accum, "lr": b.lr,
                    "optimizer": b.optimizer},
        arm_train={"epochs": study.checkpoints * study.epochs_per_checkpoint, "steps": None, "batch": t.batch_size,
                   "grad_accum": t.grad_accum, "lr": t.lr, "optimizer": t.optimizer, "shift": t.shift,
                   "timestep_sampling": t.timestep_sampling},
        eval={"images_per_concept": e.images_per_concept, "steps": e.steps, "cfg": e.cfg_scale, "width": e.width,
              "height": e.height, "probe_space": e.probe_space, "controls": len(e.control_prompts),
              "min_samples": e.min_samples},
        samplers={"flow": sampler_text({"Sampler": SAMPLER_LABELS[e.sampler], "Steps": str(e.steps),
                                        "CFG scale": f"{e.cfg_scale:g}", "Prediction": "flow",
                                        "Shift": f"{e.shift or t.recommended_shift:g}"}),
                  "ddpm": sampler_text({"Sampler": SAMPLER_LABELS[e.sampler], "Steps": str(e.steps),
                                        "CFG scale": f"{e.cfg_scale:g}", "Prediction": "epsilon"})})


# -------------------------------------------------------------------------------------------- the run

def run_study(cfg: PipelineConfig, store: ArtifactStore, run: RunFn, *, doc: Path | None = None,
              log: logging.Logger | None = None) -> StudyResult:
    """Run (or reuse) every stage of the study, then write (or reuse) its report; `doc`: also write the page
    there (docs/flow_vs_ddpm.md), with its pictures in a folder beside it."""
    log = log or logging.getLogger("booruflow.study")
    plan.check_study(cfg)
    ensure_random_model(cfg, log.info)
    runs: list[dict[str, Any]] = []

    def step(label: str, stage: str, stage_cfg: PipelineConfig):
        outcome = run(stage, stage_cfg)
        runs.append({"label": label, "stage": stage, "fingerprint": outcome.manifest.fingerprint,
                     "cached": bool(getattr(outcome, "cached", False))})
        return outcome.manifest

    # The small random model's codec VAE is exact in fp32 only, and the cache stage encodes in bf16 on a GPU:
    # its caches are made on the CPU (a cheap VAE; runtime is in no fingerprint).
    fp32 = codec_model(cfg) and cfg.runtime.device != "cpu"
    if fp32:
        log.info("study: %s has the hand-set codec VAE (exact in fp32 only): its cache stages run on the CPU",
                 cfg.train.model)
    for stage in DATA_STAGES:
        step("data", stage, cfg)
    split = plan.split_concepts(cfg, *data_tags(store))
    base_cfg = plan.base_config(cfg, split)
    buckets = {"base": step("base", "bucket", base_cfg)}
    step("base", "cache", plan.on_cpu(base_cfg) if fp32 else base_cfg)
    base: TrainManifest = step("base", "train", base_cfg)
    base_export = str(store.path(base, base.checkpoint))
    new_cfg = plan.new_data_config(cfg, split, base_export)
    buckets["new"] = step("new", "bucket", new_cfg)
    new_cache = step("new", "cache", plan.on_cpu(new_cfg) if fp32 else new_cfg)

    trains: dict[tuple[str, int], TrainManifest] = {}
    evals: dict[int, EvalManifest] = {}
    arm_cfgs: dict[str, PipelineConfig] = {}
    for seed in cfg.study.seeds:
        for arm in plan.ARMS:
            arm_cfgs[arm] = plan.arm_config(new_cfg, arm, seed, base_export)
            store.set_current("cache", new_cache.fingerprint)  # the arms read the new data, whatever ran last
            log.info("study: seed %s, %s arm", seed, arm)
            trains[(arm, seed)] = step(f"{arm}-s{seed}", "train", arm_cfgs[arm])
        store.set_current("train", trains[("flow", seed)].fingerprint)  # eval's upstream: the flow arm
        evals[seed] = step(f"eval-s{seed}", "eval", plan.eval_config(arm_cfgs["flow"], seed,
                                                                     trains[("ddpm", seed)].fingerprint))

    fp = digest({"version": STUDY_VERSION, "study": cfg.study.model_dump(mode="json"),
                 "evals": {str(s): m.fingerprint for s, m in evals.items()},
                 "buckets": {k: m.fingerprint for k, m in buckets.items()}})
    folder = study_folder(store, fp)
    if (folder / RESULT_NAME).is_file():
        log.info("study: cached output %s", folder)
        result = load_result(folder, fp, runs)
    else:
        ctx = base_context(cfg, base_cfg, arm_cfgs["flow"])
        ctx.fingerprint, ctx.device = fp, _device(cfg)
        ctx.posts, ctx.concept_posts = concept_posts(store, buckets)
        ctx.unet_params, ctx.text_params = param_counts(base_export)
        ctx.base_train["steps"] = base.steps
        ctx.arm_train["steps"] = trains[("flow", cfg.study.seeds[0])].steps
        ctx.runs = [_facts("base", base)] + [_facts(f"{a}-s{s}", m) for (a, s), m in trains.items()]
        ctx.evals = {str(s): m.fingerprint for s, m in evals.items()}
        result = write_study(cfg, store, fp, folder, build_grid(store, evals), split, ctx, runs, log)
    if doc is not None:
        result.doc = write_doc(result, doc)
        log.info("study: wrote %s", result.doc)
    return result


def study_folder(store: ArtifactStore, fp: str) -> Path:
    """`<data_root>/study/<fp>` on a local data root; the local cache's copy for object storage."""
    if store.is_local:
        return Path(store.output_path("study", fp))
    return store.local_cache / "study" / fp


def write_study(cfg: PipelineConfig, store: ArtifactStore, fp: str, folder: Path, grid: Grid,
                split: plan.ConceptSplit, ctx: ReportContext, runs: list[dict[str, Any]],
                log: logging.Logger) -> StudyResult:
    """Analyse, draw, write the report into a temp folder, then rename it into place (study.json last)."""
    study = cfg.study
    t0 = time.monotonic()
    groups = {c: split.group(c) for c in grid.concepts}
    a = analyse(grid, groups, level=study.level, reps=study.bootstrap, confidence=study.confidence,
                seed=study.stats_seed)
    ctx.samplers = _samplers(grid)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    images = {"curves": learning_curves(a, tmp), "differences": differences(a, tmp)}
    new_concepts = [c for c in grid.concepts if groups[c] == "new"][: study.sample_columns]
    sheet = samples_sheet(grid.samples, grid.arms, grid.seeds[0], grid.steps, new_concepts, tmp)
    if sheet:
        images["samples"] = sheet
    markdown = study_markdown(a, ctx, grid.probe_accuracy, images)
    (tmp / REPORT_NAME).write_text(markdown)
    from tasks.study.report import table_rows

    tables = {"concepts": table_rows(a, ctx)}
    write_csv(tmp / POINTS_NAME, a.points)
    record = {"fingerprint": fp, "version": STUDY_VERSION, "images": images, "tables": tables,
              "analysis": a.to_dict(), "context": ctx.to_dict(),
              "probe_accuracy": {k: list(v) for k, v in grid.probe_accuracy.items()}}
    atomic_write_text(tmp / RESULT_NAME, json.dumps(record, indent=1, default=str))
    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.exists():  # an incomplete folder of an earlier attempt (no study.json)
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    log.info("study: wrote %s in %.1fs", folder, time.monotonic() - t0)
    return StudyResult(folder, fp, False, markdown, images, runs, tables)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    import csv
    import io

    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def load_result(folder: Path, fp: str, runs: list[dict[str, Any]]) -> StudyResult:
    record = json.loads((folder / RESULT_NAME).read_text())
    return StudyResult(folder, fp, True, (folder / REPORT_NAME).read_text(), record["images"], runs,
                       record.get("tables", {}))


def load_analysis(folder: Path) -> tuple[Analysis, ReportContext]:
    """The analysis and context a study output recorded (to write the report again without the data)."""
    record = json.loads((folder / RESULT_NAME).read_text())
    return Analysis(**record["analysis"]), ReportContext.from_dict(record["context"])


def write_doc(result: StudyResult, doc: Path) -> Path:
    """The report as `doc`, its pictures copied to `<doc folder>/flow_vs_ddpm/` (links rewritten to them)."""
    doc = Path(doc)
    pictures = doc.parent / DOC_IMAGES
    pictures.mkdir(parents=True, exist_ok=True)
    text = result.markdown
    for rel in result.images.values():
        shutil.copyfile(result.folder / rel, pictures / Path(rel).name)
        text = text.replace(f"]({rel})", f"]({DOC_IMAGES}/{Path(rel).name})")
    atomic_write_text(doc, text)
    return doc


def write_placeholder(cfg: PipelineConfig, doc: Path) -> Path:
    """docs/flow_vs_ddpm.md before a run is recorded (the same format's first sections)."""
    ctx = base_context(cfg)
    if cfg.study.random_model:  # the model is not built yet: its size from its configs
        ctx.unet_params, ctx.text_params = config_param_counts(cfg.study.random_model)
    atomic_write_text(Path(doc), placeholder_markdown(ctx))
    return Path(doc)
