"""The eval stage: does each checkpoint draw the characters and artists it was trained on?

For every checkpoint (the base model as step 0, the train output, `eval.compare` train outputs, with
`eval.exports` each of those runs' epoch exports at the steps they were made, extra `eval.checkpoints`) and every
concept with >= `eval.min_samples` training images, plus a fixed control
set, it generates K images with the training prompt template (same seeds for every checkpoint, so the
comparison is paired), writes them as PNGs with their parameters, and detects the concept twice:
the WD tagger's own tag (when the tagger knows it) and a nearest-centroid probe fitted on the concept's
training images (data_contracts/eval.py explains both). Results: results.parquet, a learning-curve plot,
one sample grid per checkpoint.

Resumable: every (checkpoint, concept) unit is journaled under units/ as soon as it is done; a rerun after
a kill skips finished units (their PNGs are already written).
"""
from __future__ import annotations

import gc
import hashlib
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from data_contracts.errors import StageError
from data_contracts.eval import RESULTS_SCHEMA, EvalCheckpoint
from data_contracts.store import atomic_write_text
from data_contracts.tables import rows_to_table, write_table
from data_contracts.train import TrainManifest
from tasks.common.stage import StageContext, StageReport, StageResult, StageSpec
from tasks.eval.concepts import Concept, control_concepts, select_concepts, training_rows
from tasks.eval.probe import CentroidProbe, TaggerEmbedder, encode_images, latent_features, prob_logits
from tasks.eval.report import (
    learning_curve_plot,
    phase_markdown,
    phase_rows,
    probe_quality,
    summary_markdown,
    summary_rows,
)
from tasks.models.single_file import read_metadata
from tasks.models.vae import decode_latents, vae_scaling_factor, vae_shift_factor
from tasks.sample.grid import labelled_grid
from tasks.sample.main import LoadedModel, generation_info, load_for_sampling
from tasks.diffusion.objectives import objective_named
from tasks.sample.pipeline import SampleSettings, generate_latents, latents_to_images
from tasks.sample.pngmeta import save_png
from tasks.sample.prompt import pack_prompts

CODE_VERSION = "4"  # 2: report table "checkpoints" (was "summary"); 3: labelled concept x seed grids;
# 4: several concepts a generation call (batch_size images)
RESULTS_FILE = "results.parquet"
PLOT_FILE = "plots/learning_curve.png"


# ------------------------------------------------------------------------------------ checkpoints

def _extra_objective_and_step(spec: str) -> tuple[str, int]:
    path = Path(spec).expanduser()
    step = -1
    m = re.search(r"step-?0*(\d+)", path.name)
    if m:
        step = int(m.group(1))
    objective = "flow"
    if path.is_file() and path.suffix == ".safetensors":
        meta = read_metadata(path)
        objective = objective_named(meta.get("booruflow.objective") or "flow").name
        if step < 0 and str(meta.get("booruflow.steps", "")).isdigit():
            step = int(meta["booruflow.steps"])
    elif path.is_dir() and (path / "trainer.json").is_file():
        trainer = json.loads((path / "trainer.json").read_text())
        step = int(trainer.get("step", step))
        objective = objective_named((trainer.get("extra") or {}).get("objective") or "flow").name
    return objective, step


def compared_runs(ctx: StageContext) -> list[TrainManifest]:
    """The upstream train output, then every `eval.compare` one."""
    train: TrainManifest = ctx.upstream["train"]
    return [train] + [ctx.store.read_manifest(TrainManifest, fp) for fp in ctx.section.compare
                      if fp != train.fingerprint]


def run_exports(run: TrainManifest) -> list[dict[str, Any]]:
    """The epoch exports a train output lists ({epoch, step, path}, stats["exports"]), oldest first; the final
    export is the run's own checkpoint, not one of these."""
    listed = {f.path for f in run.files}
    exports = [e for e in (run.stats.get("exports") or []) if e.get("path") in listed and int(e.get("step", 0)) > 0]
    return sorted(exports, key=lambda e: int(e["step"]))


def plan_checkpoints(ctx: StageContext, runs: list[TrainManifest]) -> list[EvalCheckpoint]:
    cfg = ctx.section
    objectives = list(dict.fromkeys(r.objective for r in runs))
    out: list[EvalCheckpoint] = []
    if cfg.include_base:
        for obj in objectives:
            out.append(EvalCheckpoint(id=f"base-{obj}", label=f"base model ({obj} sampling)", spec=base_model(ctx),
                                      run="base", objective=obj, step=0))
    for r in runs:
        for snap in run_exports(r) if cfg.exports else []:
            step, rel = snap["step"], snap["path"]
            out.append(EvalCheckpoint(id=f"{r.objective}-{r.fingerprint[:8]}-s{int(step)}",
                                      label=f"{r.objective} {r.fingerprint[:8]}", spec=str(ctx.store.path(r, rel)),
                                      run=r.fingerprint, objective=r.objective, step=int(step)))
        name = f"{r.objective} {r.phase}" if r.phase else f"{r.objective} {r.fingerprint[:8]}"  # a phase by name
        out.append(EvalCheckpoint(id=f"{r.objective}-{r.fingerprint[:8]}", label=name,
                                  spec=str(ctx.store.path(r, r.checkpoint)), run=r.fingerprint,
                                  objective=r.objective, step=r.steps))
    for i, spec in enumerate(cfg.checkpoints):
        objective, step = _extra_objective_and_step(spec)
        out.append(EvalCheckpoint(id=f"extra-{i}", label=Path(spec).name or spec, spec=spec, run="extra",
                                  objective=objective, step=step))
    return out


def base_model(ctx: StageContext) -> str:
    return ctx.section.base_model or ctx.cfg.train.model


# --------------------------------------------------------------------------------------- one unit

def _open_images(pool: Path, paths: list[str], log, max_side: int) -> list[Image.Image]:
    """Reference images, shrunk to at most max_side (Danbooru originals can be 4000 px; none is kept long)."""
    out = []
    for rel in paths:
        try:
            with Image.open(pool / rel) as im:
                im.draft("RGB", (max_side, max_side))  # JPEG: decode at a reduced scale directly
                im = im.convert("RGB")
                im.thumbnail((max_side, max_side), Image.BICUBIC)
                out.append(im)
        except (OSError, ValueError) as exc:  # a bad reference is skipped, not fatal
            log.warning("eval: cannot read reference image %s: %s", rel, exc)
    return out


def _journal(work: Path, ck: EvalCheckpoint, concept: Concept) -> Path:
    return work / "units" / ck.id / f"{concept.slug}.json"


def run_units(work: Path, ck: EvalCheckpoint, model: LoadedModel, settings: SampleSettings,
              concepts: list[Concept], *, k: int, seed: int, batch_size: int, negative: str,
              probes: dict[str, CentroidProbe], space: str, tagger: TaggerEmbedder | None,
              tag_idx: dict[str, int], on_unit: Callable[[Concept], None] | None = None
              ) -> dict[str, dict[str, Any]]:
    """Generate K images for each (checkpoint, concept), classify them, journal each unit (or reuse its
    journal). The images of several concepts share a generation call (up to `batch_size` images, prompts
    mixed): a small UNet at K = 16 would otherwise run at a sliver of the GPU. Image i of every concept
    uses seed + i whatever the batching, so a unit's images do not depend on which units it was batched
    with (up to the kernels' batch-size rounding)."""
    results: dict[str, dict[str, Any]] = {}
    todo: list[Concept] = []
    for c in concepts:
        journal = _journal(work, ck, c)
        if journal.is_file():
            results[c.slug] = json.loads(journal.read_text())
            if on_unit is not None:
                on_unit(c)
        else:
            todo.append(c)
    # A call pads every prompt to its longest one's 77-token chunks, which changes a shorter prompt's conditioning:
    # only prompts of the same chunk count share a call. Concept-major: a unit finishes as early as it can.
    tokenizer = model.components.tokenizer
    by_chunks: dict[int, list[Concept]] = defaultdict(list)
    for c in todo:
        by_chunks[pack_prompts(tokenizer, [c.prompt], max_chunks=settings.max_chunks).chunks].append(c)
    step = max(1, batch_size)
    calls: list[list[tuple[Concept, int]]] = []
    for group in by_chunks.values():
        jobs = [(c, i) for c in group for i in range(k)]
        calls += [jobs[start:start + step] for start in range(0, len(jobs), step)]
    latents: dict[str, list[torch.Tensor]] = defaultdict(list)
    for part in calls:
        lat = generate_latents(model.components, [c.prompt for c, _ in part], [negative] * len(part),
                               [seed + i for _, i in part], settings)
        for (c, _), row in zip(part, lat):
            latents[c.slug].append(row)
        for c in {c.slug: c for c, _ in part}.values():  # the units this call completed
            if len(latents[c.slug]) == k:
                results[c.slug] = _finish_unit(work, ck, model, settings, c, torch.stack(latents.pop(c.slug)),
                                               seed=seed, negative=negative, probes=probes, space=space,
                                               tagger=tagger, tag_idx=tag_idx, batch_size=batch_size)
                if on_unit is not None:
                    on_unit(c)
    return results


def _finish_unit(work: Path, ck: EvalCheckpoint, model: LoadedModel, settings: SampleSettings, concept: Concept,
                 lat: torch.Tensor, *, seed: int, negative: str, probes: dict[str, CentroidProbe], space: str,
                 tagger: TaggerEmbedder | None, tag_idx: dict[str, int], batch_size: int) -> dict[str, Any]:
    """One unit's K latents -> PNGs, features, probe assignments, tagger probabilities; journaled."""
    img_dir = work / "images" / ck.id / concept.slug
    images: list[Image.Image] = []
    step = max(1, batch_size)
    with torch.no_grad():  # decoded batch_size at a time, as they were generated (the VAE's memory at full size)
        for start in range(0, len(lat), step):
            images += latents_to_images(decode_latents(model.components.vae, lat[start:start + step]))
    paths: list[str] = []
    for i, im in enumerate(images):
        p = img_dir / f"{i:05d}-{seed + i}.png"
        save_png(p, im, generation_info(concept.prompt, negative, seed + i, settings, model))
        paths.append(p.relative_to(work).as_posix())
    probs = tagger.probs(images) if tagger is not None and (space == "tagger" or tag_idx) else None
    x = latent_features(lat) if space == "latent" else prob_logits(probs)
    assign = {kind: probe.assign(x).tolist() for kind, probe in probes.items()
              if concept.kind in (kind, "control")}
    wanted = tag_idx if concept.kind == "control" else {t: i for t, i in tag_idx.items() if t == concept.tag}
    tag_probs = {t: probs[:, i].astype(float).tolist() for t, i in wanted.items()} if probs is not None else {}
    result = {"images": paths, "assign": assign, "tag_probs": tag_probs}
    atomic_write_text(_journal(work, ck, concept), json.dumps(result))
    return result


def run_unit(work: Path, ck: EvalCheckpoint, model: LoadedModel, settings: SampleSettings, concept: Concept,
             **kw: Any) -> dict[str, Any]:
    """One (checkpoint, concept) unit alone (run_units of one)."""
    return run_units(work, ck, model, settings, [concept], **kw)[concept.slug]


def vae_identity(vae: torch.nn.Module) -> str:
    """sha1 of the VAE's weights, dtype, scaling and shift: checkpoints of one run share their VAE (training
    never changes it), so the reference images' latents are encoded once per VAE, not once per checkpoint."""
    h = hashlib.sha1(f"{vae_scaling_factor(vae)} {vae_shift_factor(vae)} {next(vae.parameters()).dtype}".encode())
    for name, t in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------ aggregation

def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def checkpoint_rows(ck: EvalCheckpoint, concepts: list[Concept], controls: list[Concept],
                    units: dict[str, dict], probes: dict[str, CentroidProbe], threshold: float,
                    n_report: int) -> list[dict[str, Any]]:
    rows = []
    control_units = [units[c.slug] for c in controls]
    for c in concepts:
        u = units[c.slug]
        probe = probes.get(c.kind)
        hit = control = None
        if probe is not None:
            idx = probe.classes.index(c.tag)
            hit = _mean([float(a == idx) for a in u["assign"][c.kind]])
            control = _mean([float(a == idx) for cu in control_units for a in cu["assign"].get(c.kind, [])])
        probs = u["tag_probs"].get(c.tag)
        rows.append({
            "checkpoint": ck.id, "run": ck.run, "objective": ck.objective, "step": ck.step, "kind": c.kind,
            "concept": c.tag, "prompt": c.prompt, "n_train": len(c.train_ids), "n_images": len(u["images"]),
            "tag_in_labels": probs is not None,
            "tag_hit_rate": _mean([float(p > threshold) for p in probs]) if probs is not None else None,
            "tag_mean_prob": _mean(probs) if probs is not None else None,
            "probe_hit_rate": hit, "probe_chance": probe.chance if probe else None, "control_rate": control,
            "lift": hit - control if hit is not None and control is not None else None,
            "probe_ref_accuracy": probe.loo_accuracy if probe else None,
            "samples": u["images"][:n_report],
        })
    for c, u in zip(controls, control_units):
        n = len(u["images"])
        tp = u["tag_probs"]
        false_pos = [float(any(tp[t][i] > threshold for t in tp)) for i in range(n)] if tp else []
        rows.append({
            "checkpoint": ck.id, "run": ck.run, "objective": ck.objective, "step": ck.step, "kind": "control",
            "concept": c.tag, "prompt": c.prompt, "n_train": 0, "n_images": n, "tag_in_labels": bool(tp),
            # control rows: share of images where any evaluated character tag fires (false positives)
            "tag_hit_rate": _mean(false_pos) if tp else None, "tag_mean_prob": None,
            "probe_hit_rate": None, "probe_chance": None, "control_rate": None, "lift": None,
            "probe_ref_accuracy": None, "samples": u["images"][:n_report],
        })
    return rows


# -------------------------------------------------------------------------------------- the stage

def build(ctx: StageContext) -> StageResult:
    cfg = ctx.section
    ingest, tag = ctx.upstream["ingest"], ctx.upstream["tag"]
    rows = training_rows(ctx.store, ingest, tag)
    concepts = select_concepts(rows, kinds=cfg.kinds, min_samples=cfg.min_samples, max_concepts=cfg.max_concepts,
                               reference_images=cfg.reference_images, quality=cfg.quality_tags)
    if not concepts:
        best = max((sum(1 for r in rows if t in r[k]) for k in cfg.kinds for t in {x for r in rows for x in r[k]}),
                   default=0)
        raise StageError(f"no {' or '.join(cfg.kinds)} has eval.min_samples={cfg.min_samples} training images "
                         f"(the most frequent has {best}); lower eval.min_samples or ingest more")
    controls = control_concepts(cfg.control_prompts, cfg.quality_tags)
    runs = compared_runs(ctx)
    checkpoints = plan_checkpoints(ctx, runs)
    cache_dir = Path(ctx.cfg.runtime.cache_dir)
    device = ctx.cfg.runtime.device
    pool = ctx.store.pool_dir()
    by_id = {r["id"]: r for r in rows}

    from tasks.tag.model import resolve_model  # the tag stage's tagger, loaded the same way

    tagger = TaggerEmbedder(resolve_model(cfg.tagger or tag.model_name, cache_dir), device)
    threshold = cfg.character_threshold if cfg.character_threshold is not None else \
        float(tag.thresholds.get("character", 0.85))
    tag_idx = {c.tag: i for c in concepts if c.kind == "character"
               for i in [tagger.character_index(c.tag)] if i is not None}

    max_side = max(cfg.width, cfg.height, tagger.backend.input_size)

    def ref_images(c: Concept) -> list[Image.Image]:  # read again per distinct VAE only (latent_refs below)
        return _open_images(pool, [by_id[i]["image_path"] for i in c.ref_ids], ctx.log, max_side)

    # The tagger embedding of a training image does not depend on the checkpoint: compute it once. (Latent
    # references are encoded per checkpoint, by its own VAE.) Concepts without a readable image are dropped.
    tagger_refs: dict[str, np.ndarray] = {}
    unreadable = set()
    for c in concepts:
        ims = ref_images(c)
        if not ims:
            unreadable.add(c.slug)
        elif cfg.probe_space == "tagger":
            tagger_refs[c.slug] = prob_logits(tagger.probs(ims))
    dropped = [c.tag for c in concepts if c.slug in unreadable]
    concepts = [c for c in concepts if c.slug not in unreadable]
    if not concepts:
        raise StageError(f"no reference image of {dropped} could be read from {pool}; rerun `fm run ingest --force`")
    kinds = list(dict.fromkeys(c.kind for c in concepts))

    units_total = len(checkpoints) * (len(concepts) + len(controls))
    done = 0
    latent_refs: dict[tuple[str, str], np.ndarray] = {}  # (VAE identity, concept) -> reference latent features
    label = ""

    def unit_done(concept: Concept) -> None:
        nonlocal done
        done += 1
        ctx.progress(done / units_total, f"{label}: {concept.tag}")

    all_rows: list[dict[str, Any]] = []
    for ck in checkpoints:
        label = ck.label
        model = load_for_sampling(ck.spec, cache_dir=cache_dir, device=device, base_model=base_model(ctx))
        settings = SampleSettings(
            steps=cfg.steps, cfg=cfg.cfg_scale, shift=cfg.shift or model.recommended_shift or 3.0,
            sampler=cfg.sampler, width=cfg.width, height=cfg.height,
            prediction=objective_named(ck.objective).prediction).check()
        probes: dict[str, CentroidProbe] = {}
        vae_id = vae_identity(model.components.vae) if cfg.probe_space == "latent" else ""
        for kind in kinds:
            members = [c for c in concepts if c.kind == kind]
            if cfg.probe_space == "latent":
                for c in members:
                    if (vae_id, c.slug) not in latent_refs:
                        latent_refs[(vae_id, c.slug)] = latent_features(
                            encode_images(model.components.vae, ref_images(c), cfg.width, cfg.height))
                ref_feats = [latent_refs[(vae_id, c.slug)] for c in members]
            else:
                ref_feats = [tagger_refs[c.slug] for c in members]
            probes[kind] = CentroidProbe.fit([c.tag for c in members], ref_feats)
        units = run_units(ctx.work, ck, model, settings, concepts + controls, k=cfg.images_per_concept,
                          seed=cfg.seed, batch_size=cfg.batch_size, negative=cfg.negative_prompt, probes=probes,
                          space=cfg.probe_space, tagger=tagger, tag_idx=tag_idx, on_unit=unit_done)
        all_rows += checkpoint_rows(ck, concepts, controls, units, probes, threshold, cfg.samples_in_report)
        _grid(ctx.work, ck, concepts + controls, units)
        ctx.log.info("eval: %s done (%d concepts)", ck.label, len(concepts))
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    write_table(rows_to_table(all_rows, RESULTS_SCHEMA), ctx.work / RESULTS_FILE, RESULTS_SCHEMA)
    plot = learning_curve_plot(all_rows, checkpoints, ctx.work / PLOT_FILE)
    summary = summary_rows(all_rows, checkpoints)
    md = summary_markdown(summary, cfg, concepts, tag_idx, dropped, tagger.folder.name, probe_quality(all_rows))
    phases = phase_rows(all_rows, checkpoints, {r.fingerprint: r.phase for r in runs if r.phase})
    md += phase_markdown(phases)
    images = {"learning curve": PLOT_FILE} if plot else {}
    images.update({f"samples: {ck.label} (step {ck.step})": f"grids/{ck.id}.png" for ck in checkpoints})
    report = StageReport(
        summary_md=md,
        tables={"checkpoints": summary, **({"phases": phases} if phases else {}),
                "results": [{k: v for k, v in r.items() if k not in ("prompt", "samples", "run")} for r in all_rows]},
        images=images,
    )
    concept_lists: dict[str, list[str]] = defaultdict(list)
    for c in concepts:
        concept_lists[c.kind].append(c.tag)
    return StageResult(
        row_counts={"results": len(all_rows)},
        stats={"checkpoints": len(checkpoints), "concepts": len(concepts),
               "images": sum(r["n_images"] for r in all_rows),
               "dropped_concepts": dropped, "headline": summary},
        manifest_fields={"probe_space": cfg.probe_space, "checkpoints": [c.model_dump() for c in checkpoints],
                         "concepts": dict(concept_lists), "plot": PLOT_FILE if plot else None},
        report=report,
    )


GRID_COLS = 8  # images per concept shown in a checkpoint's grid (all of them are on disk)


def _grid(work: Path, ck: EvalCheckpoint, concepts: list[Concept], units: dict[str, dict]) -> None:
    """One row per concept (its tag, kind and training-image count), one column per seed."""
    rows, row_labels, seeds = [], [], []
    for c in concepts:
        files = units[c.slug]["images"][:GRID_COLS]
        if not files:
            continue
        row = []
        for rel in files:
            with Image.open(work / rel) as im:
                row.append(im.convert("RGB"))
        rows.append(row)
        if c.kind == "control":
            row_labels.append(f"control (no concept)\n{c.prompt}")
        else:
            row_labels.append(f"{c.tag}\n{c.kind}, {len(c.train_ids)} training images")
        if len(files) > len(seeds):  # names are <index>-<seed>.png
            seeds = [Path(f).stem.split("-")[-1] for f in files]
    if rows:
        title = f"{ck.label} (step {ck.step}): rows = concepts, columns = seeds; same seeds for every checkpoint"
        grid = labelled_grid(rows, row_labels, [f"seed {s}" for s in seeds], title=title,
                             max_cell=256 if len(seeds) <= 4 else 192)
        save_png(work / "grids" / f"{ck.id}.png", grid, None)


SPEC = StageSpec(name="eval", upstream=("ingest", "tag", "train"), code_version=CODE_VERSION, build=build,
                 resumable=True, gpu=True)
