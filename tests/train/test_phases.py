"""Training in phases: phase configs, the stage plan, and two real phases chained on the demo mini-booru
(real stages, real Parquet, the tiny SD1.5 stand-in; no Prefect: the flow runs the same run_phases)."""
from __future__ import annotations

import pytest

from data_contracts.bucket import BucketManifest
from data_contracts.cache import CacheManifest
from data_contracts.errors import ConfigError
from data_contracts.store import ArtifactStore
from data_contracts.train import TrainManifest
from pipeline_config.load import load_config, section_dict
from tasks.common.stage import run_stage
from tasks.phases import check_phase, eval_config, phase_config, plan, run_phases
from tasks.registry import stage_spec

TWO = [{"name": "base"},
       {"name": "hires", "overrides": {"bucket.resolution": 320, "train.lr": 1e-4, "train.max_steps": 3}}]


def _cfg(phases=TWO, extra=None):
    return load_config("demo", {"train.phases": phases, **(extra or {})})


def test_phase_configs_apply_their_overrides_and_chain_the_weights():
    cfg = _cfg()
    base, hires = cfg.train.phases
    b = phase_config(cfg, base)
    h = phase_config(cfg, hires, init_model="/runs/base.safetensors")
    assert b.bucket.resolution == 256 and h.bucket.resolution == 320
    assert h.train.lr == 1e-4 and h.train.max_steps == 3 and b.train.lr == cfg.train.lr
    assert h.train.model == "/runs/base.safetensors" and b.train.model == cfg.train.model
    assert (b.train.run_name, h.train.run_name) == ("booruflow-demo-base", "booruflow-demo-hires")
    assert b.train.phases == [] and h.train.phase == "hires"
    # the phase list is in no fingerprint: a third phase leaves the first two cached
    three = _cfg([*TWO, {"name": "aesthetic", "overrides": {"train.lr": 1e-5}}])
    assert section_dict(phase_config(three, three.train.phases[0]), "train") == section_dict(b, "train")
    assert "phases" not in section_dict(cfg, "train") and "phase" not in section_dict(h, "train")
    # one phase, no phases key: today's train section
    assert section_dict(load_config("demo"), "train") == section_dict(_cfg([]), "train")


@pytest.mark.parametrize("phases, match", [
    ([{"name": "a", "overrides": {"ingest.quota": 1}}], "bucket, cache or train"),
    ([{"name": "a", "overrides": {"train.phases": []}}], "do not nest"),
    ([{"name": "a"}, {"name": "a"}], "unique"),
    ([{"name": "Bad Name"}], "pattern"),
])
def test_bad_phases_are_config_errors(phases, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(phases)


def test_a_phase_override_with_a_typo_names_the_phase_and_the_key():
    cfg = _cfg([{"name": "hires", "overrides": {"bucket.resolutoin": 320}}])
    with pytest.raises(ConfigError, match=r"train.phases\[hires\].*unknown key 'bucket.resolutoin'.*resolution"):
        phase_config(cfg, cfg.train.phases[0])
    with pytest.raises(ConfigError, match="the phases are base, hires"):
        check_phase(_cfg(), "hi-res")


def test_the_plan_runs_what_a_selected_stage_needs():
    cfg = _cfg()
    every = ["ingest", "dedup", "tag", "quality", "bucket", "cache", "train", "eval"]
    assert plan(cfg, every, None) == [{"bucket": True, "cache": True, "train": True}] * 2
    # one phase's train: its bucket and cache and the base's whole chain run too (cached when built)
    assert plan(cfg, ["train"], "hires") == [{"bucket": False, "cache": False, "train": False},
                                             {"bucket": False, "cache": False, "train": True}]
    assert plan(cfg, ["bucket"], "hires") == [dict.fromkeys(("bucket", "cache", "train")),
                                              {"bucket": True, "cache": None, "train": None}]
    assert plan(cfg, ["cache"], None) == [{"bucket": False, "cache": True, "train": None}] * 2
    assert plan(cfg, ["eval"], None) == [{"bucket": False, "cache": False, "train": False}] * 2
    assert plan(cfg, ["train"], "base")[1] == dict.fromkeys(("bucket", "cache", "train"))


def test_two_phases_chain_on_the_demo_booru(tmp_path):
    # one optimiser step per phase (a step at 320² costs about a second here): what chains is the export
    one_step = [TWO[0], {**TWO[1], "overrides": {**TWO[1]["overrides"], "train.max_steps": 1}}]
    cfg = _cfg(one_step, extra={"data_root": str(tmp_path / "data"), "runtime.cache_dir": str(tmp_path / "cache"),
                                "ingest.embedded.posts": 60, "ingest.embedded.max_side": 384, "train.max_steps": 1,
                                "train.checkpoint_every": 100, "train.sampling.every": 0, "train.sampling.prompts": [],
                                "train.validation.every": 0, "train.export_diffusers": False})
    store = ArtifactStore.for_config(cfg)
    for stage in ("ingest", "dedup", "tag", "quality"):
        run_stage(stage_spec(stage), cfg, store)
    calls: list[tuple[str, str, bool]] = []

    def run(stage, pcfg, force):
        calls.append((stage, pcfg.train.phase, force))
        out = run_stage(stage_spec(stage), pcfg, store, force=force)
        return {"stage": stage, "fingerprint": out.manifest.fingerprint, "cached": out.cached}

    def init_path(info):
        manifest = store.read_manifest(TrainManifest, info["fingerprint"])
        return str(store.path(manifest, manifest.checkpoint))

    done = run_phases(cfg, ["bucket", "cache", "train"], run, init_path)
    assert [c[:2] for c in calls] == [(s, p) for p in ("base", "hires") for s in ("bucket", "cache", "train")]
    fps = {(r["stage"], r["phase"]): r["fingerprint"] for r in done.results}
    buckets = {p: store.read_manifest(BucketManifest, fps[("bucket", p)]) for p in ("base", "hires")}
    assert max(w * h for w, h in buckets["base"].buckets) == 256 * 256
    assert max(w * h for w, h in buckets["hires"].buckets) == 320 * 320
    caches = {p: store.read_manifest(CacheManifest, fps[("cache", p)]) for p in ("base", "hires")}
    assert caches["base"].fingerprint != caches["hires"].fingerprint
    assert caches["hires"].upstream["bucket"] == buckets["hires"].fingerprint
    trains = {p: store.read_manifest(TrainManifest, fps[("train", p)]) for p in ("base", "hires")}
    assert trains["base"].phase == "base" and trains["hires"].phase == "hires"
    assert trains["hires"].upstream["cache"] == caches["hires"].fingerprint
    assert trains["base"].checkpoint == "booruflow-demo-base.safetensors"
    # the second phase started from the first one's export, not from the base model
    from tasks.models.identity import file_identity
    base_export = store.path(trains["base"], trains["base"].checkpoint)
    assert trains["hires"].base_model_identity == file_identity(base_export, tmp_path / "cache")
    assert trains["hires"].base_model_identity != trains["base"].base_model_identity
    assert done.last_config.train.phase == "hires"
    ev = eval_config(done.last_config, done.trains)
    assert ev.eval.compare == [trains["base"].fingerprint]

    # rerunning one phase's train reuses everything before it and rebuilds only that train
    calls.clear()
    again = run_phases(cfg, ["train"], run, init_path, force=True, only="hires")
    assert calls == [("bucket", "base", False), ("cache", "base", False), ("train", "base", False),
                     ("bucket", "hires", False), ("cache", "hires", False), ("train", "hires", True)]
    assert [r["cached"] for r in again.results] == [True] * 5 + [False]
    assert again.trains["hires"]["fingerprint"] == trains["hires"].fingerprint  # same inputs, same output name


def test_eval_reports_what_the_later_phase_kept_of_each_concept():
    from data_contracts.eval import EvalCheckpoint
    from tasks.eval.report import phase_markdown, phase_rows

    cks = [EvalCheckpoint(id="base-flow", label="base", spec="x", run="base", objective="flow", step=0),
           EvalCheckpoint(id="a", label="flow base", spec="a", run="fpA", objective="flow", step=10),
           EvalCheckpoint(id="b", label="flow hires", spec="b", run="fpB", objective="flow", step=4)]
    rows = [{"checkpoint": ck, "concept": c, "kind": kind, "probe_hit_rate": hit}
            for ck, c, kind, hit in [("a", "miku", "character", 0.75), ("b", "miku", "character", 0.5),
                                     ("a", "artist_x", "artist", 0.25), ("b", "artist_x", "artist", 0.5),
                                     ("a", "control", "control", 0.0), ("base-flow", "miku", "character", 0.1)]]
    table = phase_rows(rows, cks, {"fpA": "base", "fpB": "hires"})
    assert table == [{"concept": "miku", "kind": "character", "base": 0.75, "hires": 0.5, "change": -0.25},
                     {"concept": "artist_x", "kind": "artist", "base": 0.25, "hires": 0.5, "change": 0.25}]
    assert "largest drop -0.250 (miku)" in phase_markdown(table) and "base -> hires" in phase_markdown(table)
    assert phase_rows(rows, cks, {"fpA": "base"}) == []  # one phase: nothing to compare
