"""The study end to end on the CPU: real stages on a 200-post mini-booru with the builtin tiny SD1.5, 2 seeds x
2 arms, 3 checkpoints an arm (+ the base at step 0). Checks the structure, not what the tiny model learns."""
from __future__ import annotations

import gc
import json

import pytest

from data_contracts.eval import EvalManifest
from data_contracts.store import ArtifactStore
from data_contracts.train import TrainManifest
from tasks.sample.pngmeta import read_png_info
from tasks.study.collect import build_grid
from tasks.study.runner import RESULT_NAME, run_study

from .conftest import NEW_ARTIST, NEW_CHARACTER, stage_runner, study_config


@pytest.fixture()
def frozen_heap():
    """The eval stage collects garbage after every checkpoint; with torch and diffusers loaded, a full collection
    walks ~1M objects (0.5 s each time here). Freezing what is already loaded keeps the test to its own work."""
    import diffusers  # noqa: F401  (loaded before the freeze)
    import transformers  # noqa: F401

    import tasks.models.load  # noqa: F401
    import tasks.sample.main  # noqa: F401
    import tasks.train.loop  # noqa: F401

    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


class _Killed(Exception):
    pass


def test_study_runs_every_arm_seed_and_checkpoint_and_reuses_everything(tmp_path, frozen_heap):
    cfg = study_config(tmp_path)
    store = ArtifactStore(cfg.data_root, local_cache=tmp_path / "local")
    run = stage_runner(store)
    doc = tmp_path / "docs" / "flow_vs_ddpm.md"

    def killed_at_the_first_eval(stage, stage_cfg):
        if stage == "eval":
            raise _Killed(stage)
        return run(stage, stage_cfg)

    with pytest.raises(_Killed):  # the study dies after seed 0's two arms trained
        run_study(cfg, store, killed_at_the_first_eval)
    first = run_study(cfg, store, run, doc=doc)  # the rerun: only what is missing
    reused = [(r["label"], r["stage"]) for r in first.runs if r["cached"]]
    assert reused == [("data", s) for s in ("ingest", "dedup", "tag", "quality")] + \
        [("base", s) for s in ("bucket", "cache", "train")] + [("new", "bucket"), ("new", "cache"),
                                                               ("flow-s0", "train"), ("ddpm-s0", "train")]

    labels = [(r["label"], r["stage"]) for r in first.runs]
    assert labels[:4] == [("data", s) for s in ("ingest", "dedup", "tag", "quality")]
    assert [lbl for lbl, stage in labels if stage == "train"] == ["base", "flow-s0", "ddpm-s0", "flow-s1", "ddpm-s1"]
    assert [lbl for lbl, stage in labels if stage == "eval"] == ["eval-s0", "eval-s1"]
    trains = {r["label"]: store.read_manifest(TrainManifest, r["fingerprint"]) for r in first.runs
              if r["stage"] == "train"}
    base = trains.pop("base")
    assert base.objective == "ddpm"
    assert {m.objective for m in trains.values()} == {"flow", "ddpm"}
    steps = {m.steps for m in trains.values()}
    assert len(steps) == 1  # both arms, both seeds: the same data and steps
    assert all(len(m.stats["exports"]) == 2 for m in trains.values())  # 3 checkpoints: 2 epoch exports + final
    assert len({m.upstream["cache"] for m in trains.values()}) == 1 and base.upstream["cache"] not in \
        {m.upstream["cache"] for m in trains.values()}  # the arms share the new data, the base had its own

    evals = {int(r["label"].removeprefix("eval-s")): store.read_manifest(EvalManifest, r["fingerprint"])
             for r in first.runs if r["stage"] == "eval"}
    for seed, m in evals.items():
        arms = {arm: sorted(c.step for c in m.checkpoints if c.objective == arm) for arm in ("flow", "ddpm")}
        assert arms["flow"] == arms["ddpm"] and len(arms["flow"]) == 4 and arms["flow"][0] == 0  # base + 3
        assert {c.run for c in m.checkpoints if c.step == 0} == {"base"}
    assert evals[0].fingerprint != evals[1].fingerprint

    grid = build_grid(store, evals)
    assert grid.hits.shape == (2, 2, 4, len(grid.concepts)) and (grid.n > 0).all()
    assert NEW_CHARACTER in grid.concepts and NEW_ARTIST in grid.concepts
    # each arm sampled with its own objective's sampler (PNG parameters of its images)
    flow_png = grid.samples[("flow", 0, grid.steps[-1], NEW_CHARACTER)]
    eps_png = grid.samples[("ddpm", 0, grid.steps[-1], NEW_CHARACTER)]
    assert read_png_info(flow_png).params["Prediction"] == "flow" and "Shift" in read_png_info(flow_png).params
    assert read_png_info(eps_png).params["Prediction"] == "epsilon"

    # the report: intervals everywhere, pictures, the doc beside it
    record = json.loads((first.folder / RESULT_NAME).read_text())
    a = record["analysis"]
    assert a["steps"] == list(grid.steps) and a["seeds"] == [0, 1]
    for row in a["concepts"]:
        for key in ("base", "flow", "ddpm", "diff", "flow_change", "ddpm_change"):
            assert {"value", "lo", "hi"} <= set(row[key]) and row[key]["lo"] <= row[key]["hi"]
    groups = {r["concept"]: r["group"] for r in a["concepts"]}
    assert groups[NEW_CHARACTER] == groups[NEW_ARTIST] == "new" and "old" in groups.values()
    assert {"final", "final_diff", "area_diff", "forgetting", "base_old", "control"} <= set(a["headline"])
    assert len(a["per_seed"]) == 4 and len(a["difference"]) == 4
    assert (first.folder / "points.csv").read_text().count("\n") == 1 + 2 * 4 * len(grid.concepts)
    for rel in first.images.values():
        assert (first.folder / rel).is_file()
    assert set(first.images) == {"curves", "differences", "samples"}
    md = first.markdown
    assert "## What the data support" in md and "What it does not show" in md
    assert "FlowMatchEulerDiscreteScheduler" in md and "SD1.5 scheduler" in md  # each arm's sampler is named
    text = doc.read_text()
    assert "flow_vs_ddpm/learning_curves.png" in text and (doc.parent / "flow_vs_ddpm" / "samples.png").is_file()

    # resumable: a second call reuses every stage output and the study's own
    again = run_study(cfg, store, run)
    assert again.cached and again.fingerprint == first.fingerprint
    assert all(r["cached"] for r in again.runs)
    assert [r["fingerprint"] for r in again.runs] == [r["fingerprint"] for r in first.runs]
