"""The study's numbers, read from its eval outputs: counts per (arm, seed, step, concept), as stats.py takes them.

An eval output holds one row per (checkpoint, concept) with the probe hit rate over `n_images` images and the
share of the control images the probe put on the concept (`control_rate`); rates × image counts give the counts
back exactly. A checkpoint's arm is the objective it was sampled with: the base appears once per arm (step 0,
`base-flow` / `base-ddpm`), each arm's exports and final export at the steps they were made.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_contracts.errors import StageError
from data_contracts.eval import RESULTS_SCHEMA, EvalManifest
from data_contracts.store import ArtifactStore
from data_contracts.tables import read_table
from tasks.study.plan import ARMS

CONCEPT_KINDS = ("character", "artist")


@dataclass
class Grid:
    """Counts of the whole study, arms paired by seed. Arrays are [A, S, T, C] unless said otherwise."""

    arms: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: tuple[int, ...]
    concepts: tuple[str, ...]
    kinds: tuple[str, ...]  # [C]
    hits: np.ndarray
    n: np.ndarray
    ctrl_hits: np.ndarray  # control images the probe put on the concept
    ctrl_n: np.ndarray  # [A, S, T] control images generated
    chance: np.ndarray  # [C] 1 / concepts of its kind
    probe_accuracy: dict[str, tuple[float, float]] = field(default_factory=dict)  # kind -> (LOO accuracy, chance)
    samples: dict[tuple[str, int, int, str], Path] = field(default_factory=dict)  # (arm, seed, step, concept) -> PNG
    prompts: dict[str, str] = field(default_factory=dict)  # concept -> the prompt it was sampled with


def _count(rate: float | None, n: int, what: str) -> int:
    if rate is None:
        raise StageError(f"study: {what} has no probe hit rate (is the probe space set for every kind?)")
    return int(round(float(rate) * n))


def seed_rows(store: ArtifactStore, manifest: EvalManifest) -> list[dict[str, Any]]:
    """The eval's result rows with each checkpoint's arm and step (base rows: step 0 of the arm they sample as);
    extra checkpoints (`eval.checkpoints`) are left out."""
    by_id = {c.id: c for c in manifest.checkpoints}
    table = read_table(store.path(manifest, "results.parquet"), RESULTS_SCHEMA,
                       f"eval/{manifest.fingerprint}/results.parquet").to_pylist()
    out = []
    for r in table:
        ck = by_id.get(r["checkpoint"])
        if ck is None or ck.run == "extra" or ck.objective not in ARMS:
            continue
        out.append({**r, "arm": ck.objective, "step": 0 if ck.run == "base" else int(ck.step)})
    return out


def build_grid(store: ArtifactStore, evals: dict[int, EvalManifest]) -> Grid:
    """All seeds' eval outputs as one Grid; every arm and seed must have checkpoints at the same steps."""
    rows_by_seed = {seed: seed_rows(store, m) for seed, m in evals.items()}
    seeds = tuple(sorted(rows_by_seed))
    steps_of = {(seed, arm): sorted({r["step"] for r in rows if r["arm"] == arm})
                for seed, rows in rows_by_seed.items() for arm in ARMS}
    reference = steps_of[(seeds[0], ARMS[0])]
    for key, steps in steps_of.items():
        if steps != reference:
            raise StageError(f"study: seed {key[0]}'s {key[1]} arm was evaluated at steps {steps}, seed {seeds[0]}'s "
                             f"{ARMS[0]} arm at {reference}: every arm and seed must train the same steps (same data, "
                             "batch and epochs); rerun the study with one config")
    first = rows_by_seed[seeds[0]]
    concepts = tuple(dict.fromkeys(r["concept"] for r in first if r["kind"] in CONCEPT_KINDS))
    kinds = tuple(next(r["kind"] for r in first if r["concept"] == c) for c in concepts)
    shape = (len(ARMS), len(seeds), len(reference), len(concepts))
    hits, n, ctrl_hits = (np.zeros(shape, np.int64) for _ in range(3))
    ctrl_n = np.zeros(shape[:3], np.int64)
    seen = np.zeros(shape, bool)
    chance = np.full(len(concepts), np.nan)
    grid = Grid(ARMS, seeds, tuple(reference), concepts, kinds, hits, n, ctrl_hits, ctrl_n, chance)
    for s, seed in enumerate(seeds):
        rows = rows_by_seed[seed]
        for r in rows:
            if r["kind"] != "control":
                continue
            a, t = ARMS.index(r["arm"]), reference.index(r["step"])
            ctrl_n[a, s, t] += int(r["n_images"])
        for r in rows:
            if r["kind"] not in CONCEPT_KINDS or r["concept"] not in concepts:
                continue
            a, t, c = ARMS.index(r["arm"]), reference.index(r["step"]), concepts.index(r["concept"])
            what = f"eval {evals[seed].fingerprint} {r['checkpoint']} {r['concept']}"
            n[a, s, t, c] = int(r["n_images"])
            hits[a, s, t, c] = _count(r["probe_hit_rate"], int(r["n_images"]), what)
            if r["control_rate"] is not None:
                ctrl_hits[a, s, t, c] = int(round(float(r["control_rate"]) * ctrl_n[a, s, t]))
            seen[a, s, t, c] = True
            chance[c] = float(r["probe_chance"]) if r["probe_chance"] is not None else np.nan
            grid.prompts.setdefault(r["concept"], r["prompt"])
            if r["kind"] not in grid.probe_accuracy and r["probe_ref_accuracy"] is not None:
                grid.probe_accuracy[r["kind"]] = (float(r["probe_ref_accuracy"]), float(r["probe_chance"]))
            if r["samples"]:
                grid.samples[(r["arm"], seed, r["step"], r["concept"])] = \
                    store.path(evals[seed], r["samples"][0])
    if not seen.all():
        a, s, t, c = (int(i[0]) for i in np.nonzero(~seen))
        raise StageError(f"study: no eval result for {concepts[c]} at step {reference[t]} of the {ARMS[a]} arm, seed "
                         f"{seeds[s]}: the evals of the seeds must cover the same concepts (same eval config)")
    return grid
