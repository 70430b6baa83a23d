"""A/B: flow vs DDPM ε on the same cache and step budget, evaluated the same way."""
import shutil

import pytest

from data_contracts.errors import ConfigError
from tasks.eval.ab import ab_configs, run_ab
from tasks.sample.pngmeta import read_png_info

from .conftest import make_config, run


def test_ab_configs_differ_only_in_the_objective(tmp_path):
    cfg = make_config(tmp_path)
    variants = ab_configs(cfg)
    assert variants["flow"].train.objective == "flow" and variants["ddpm"].train.objective == "ddpm"
    a, b = variants["flow"].model_dump(), variants["ddpm"].model_dump()
    a["train"].pop("objective"), b["train"].pop("objective")
    assert a == b
    with pytest.raises(ConfigError, match="max_steps"):
        ab_configs(cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": None})}))


AB_STEPS = 20  # the A/B's own step budget: the comparison needs equal budgets, not good models


@pytest.fixture
def ab_chain(cached_chain, tmp_path):
    """(store, cfg) on a private copy of the eval chain's data root: run_ab moves the current train output,
    which the eval tests on the shared chain read. The A/B trains AB_STEPS steps per objective and evaluates
    the characters with 2 images each (the model path stays the chain's: the cache output is reused)."""
    from data_contracts.store import ArtifactStore

    root, _, chain = cached_chain
    for sub in ("data", "local", "cache"):
        if (root / sub).exists():
            shutil.copytree(root / sub, tmp_path / sub)
    cfg = make_config(tmp_path, cache={"model": chain.cache.model},
                      train={"model": chain.train.model, "max_steps": AB_STEPS},
                      eval={"kinds": ["character"], "images_per_concept": 2, "batch_size": 2})
    store = ArtifactStore(cfg.data_root, local_cache=tmp_path / "local")
    assert store.current("cache") is not None
    return store, cfg


@pytest.mark.slow
def test_ab_trains_both_objectives_and_evaluates_them_alike(ab_chain):
    store, cfg = ab_chain
    out = run_ab(cfg, store, lambda stage, c: run(stage, c, store))
    flow, ddpm = out["train"]["flow"].manifest, out["train"]["ddpm"].manifest
    assert not out["train"]["flow"].cached and not out["train"]["ddpm"].cached
    assert flow.steps == ddpm.steps == cfg.train.max_steps
    assert flow.upstream == ddpm.upstream == {"cache": store.current("cache")}  # the same cache output: same data
    m = out["eval"].manifest
    by_run = {c.run: c for c in m.checkpoints}
    assert {c.id for c in m.checkpoints} >= {"base-flow", "base-ddpm"}
    assert by_run[ddpm.fingerprint].objective == "ddpm" and by_run[flow.fingerprint].objective == "flow"
    summary = {s["checkpoint"]: s for s in out["eval"].report.tables["checkpoints"]}
    eps_ck = by_run[ddpm.fingerprint].id
    assert summary[eps_ck]["character_probe_hit_rate"] is not None
    # the ε model was sampled as an ε model
    from data_contracts.eval import RESULTS_SCHEMA
    from data_contracts.tables import read_table

    rows = read_table(store.path(m, "results.parquet"), RESULTS_SCHEMA).to_pylist()
    sample = next(r["samples"][0] for r in rows if r["checkpoint"] == eps_ck and r["kind"] == "character")
    assert read_png_info(store.path(m, sample)).params["Prediction"] == "epsilon"
