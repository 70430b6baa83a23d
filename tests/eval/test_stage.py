"""fm/eval end to end: a model trained on the mini-booru draws its characters; the untrained one does not."""
import json
from pathlib import Path

import numpy as np
from PIL import Image

from data_contracts.eval import RESULTS_SCHEMA, EvalManifest
from data_contracts.tables import read_table
from tasks.sample.pngmeta import read_png_info

from .conftest import CHARACTERS, run


def test_trained_model_hits_its_characters_the_untrained_one_does_not(trained):
    root, store, cfg = trained
    out = run("eval", cfg, store)
    m: EvalManifest = out.manifest
    assert m.probe_space == "latent"
    assert [c.id for c in m.checkpoints][0] == "base-flow" and m.checkpoints[0].step == 0
    assert m.checkpoints[1].run != "base" and m.checkpoints[1].step == 150
    assert sorted(m.concepts["character"]) == sorted(CHARACTERS)

    table = read_table(store.path(m, "results.parquet"), RESULTS_SCHEMA).to_pylist()
    chars = [r for r in table if r["kind"] == "character"]
    by_ck = {ck.id: [r for r in chars if r["checkpoint"] == ck.id] for ck in m.checkpoints}
    base, tuned = by_ck["base-flow"], by_ck[m.checkpoints[1].id]
    hit = {k: float(np.mean([r["probe_hit_rate"] for r in v])) for k, v in (("base", base), ("tuned", tuned))}
    lift = {k: float(np.mean([r["lift"] for r in v])) for k, v in (("base", base), ("tuned", tuned))}
    chance = base[0]["probe_chance"]
    assert abs(chance - 1 / 3) < 1e-6 and base[0]["probe_ref_accuracy"] > 0.5  # the probe tells the characters apart
    # The real comparison: the fine-tune draws each character far above chance, the untrained model does not.
    assert hit["tuned"] >= 0.7, (hit, lift)
    assert hit["tuned"] > hit["base"] + 0.3, (hit, lift)
    assert lift["tuned"] > lift["base"] + 0.3, (hit, lift)
    assert all(r["n_images"] == 6 and r["n_train"] >= 8 for r in chars)
    assert all(r["tag_in_labels"] is False and r["tag_hit_rate"] is None for r in chars)  # fictional characters

    # artifacts: sample PNGs with parameters, a grid per checkpoint, the learning-curve plot, report tables
    sample = store.path(m, chars[0]["samples"][0])
    info = read_png_info(sample)
    assert info.prompt == chars[0]["prompt"] and info.params["Steps"] == "16"
    assert CHARACTERS[0].split("_(")[0].replace("_", " ") in " ".join(r["prompt"] for r in chars)
    plot = Image.open(store.path(m, m.plot))
    assert plot.width > 300
    for ck in m.checkpoints:
        assert store.path(m, f"grids/{ck.id}.png").is_file()
    assert {s["checkpoint"] for s in out.report.tables["checkpoints"]} == {c.id for c in m.checkpoints}
    assert "latent" in out.report.summary_md
    assert any(r["kind"] == "control" for r in table)

    again = run("eval", cfg, store)  # same fingerprint: cached, nothing recomputed
    assert again.cached and again.manifest.fingerprint == m.fingerprint


class _Killed(Exception):
    pass


def test_a_killed_eval_resumes_from_its_journal(trained):
    _, store, cfg = trained
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"kinds": ["character"], "images_per_concept": 2})})
    seen = []

    def kill_after_three(fraction, message):
        seen.append(message)
        if len(seen) == 3:
            raise _Killed(message)

    try:
        run("eval", cfg, store, progress=kill_after_three)
    except _Killed:
        pass
    else:
        raise AssertionError("the eval was not interrupted")
    (work,) = list((Path(cfg.data_root) / "eval" / "_work").iterdir())  # the interrupted run's work folder
    done = sorted((work / "units").rglob("*.json"))
    assert len(done) == 3
    first_png = work / json.loads(done[0].read_text())["images"][0]
    stamp = first_png.stat().st_mtime_ns
    out = run("eval", cfg, store)  # resumes: the three finished units are reused, not regenerated
    assert not out.cached
    m = out.manifest
    assert store.path(m, first_png.relative_to(work).as_posix()).stat().st_mtime_ns == stamp
    rows = read_table(store.path(m, "results.parquet"), RESULTS_SCHEMA).to_pylist()
    assert len(rows) == 2 * (3 + 2) and all(r["n_images"] == 2 for r in rows)
