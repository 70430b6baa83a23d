"""One (checkpoint, concept) unit with the real tiny models: the tagger path, journaling, aggregation."""
import json

import numpy as np
import pytest

from data_contracts.eval import EvalCheckpoint
from tasks.eval.concepts import Concept
from tasks.eval.probe import CentroidProbe, TaggerEmbedder
from tasks.eval.stage import checkpoint_rows, run_unit
from tasks.sample.pipeline import SampleSettings


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tasks.sample.main import load_for_sampling
    from tasks.tag.model import resolve_model

    cache = tmp_path_factory.mktemp("unit-cache")
    model = load_for_sampling("builtin:tiny-sd15", cache_dir=cache, device="cpu")
    tagger = TaggerEmbedder(resolve_model("builtin:tiny-wd-swinv2", cache), "cpu")
    return model, tagger


def test_tagger_unit_records_own_tag_probs_and_is_journaled(models, tmp_path):
    model, tagger = models
    miku = tagger.character_index("hatsune_miku")
    assert miku is not None and tagger.character_index("long_hair") is None  # general tags are not characters
    ck = EvalCheckpoint(id="ck", label="ck", spec="builtin:tiny-sd15", run="base", objective="flow", step=0)
    settings = SampleSettings(steps=2, width=64, height=64)
    concepts = [Concept("character", "hatsune_miku", "1girl, hatsune miku", [1, 2], [1, 2]),
                Concept("character", "hakurei_reimu", "1girl, hakurei reimu", [3, 4], [3, 4])]
    control = Concept("control", "control-0", "1girl, solo")
    rng = np.random.default_rng(0)
    probe = CentroidProbe.fit([c.tag for c in concepts], [rng.normal(k, 1, (3, 10861)) for k in range(2)])
    tag_idx = {"hatsune_miku": miku, "hakurei_reimu": tagger.character_index("hakurei_reimu")}
    kw = dict(k=3, seed=5, batch_size=2, negative="", probes={"character": probe}, space="tagger", tagger=tagger,
              tag_idx=tag_idx)
    units = {c.slug: run_unit(tmp_path, ck, model, settings, c, **kw) for c in concepts + [control]}
    u = units[concepts[0].slug]
    assert len(u["images"]) == 3 and all((tmp_path / p).is_file() for p in u["images"])
    assert list(u["tag_probs"]) == ["hatsune_miku"] and len(u["assign"]["character"]) == 3
    assert sorted(units[control.slug]["tag_probs"]) == ["hakurei_reimu", "hatsune_miku"]  # controls: every tag
    journal = tmp_path / "units" / "ck" / f"{concepts[0].slug}.json"
    assert json.loads(journal.read_text()) == u
    journal.write_text(json.dumps({**u, "assign": {"character": [1, 1, 1]}}))  # a finished unit is reused as is
    assert run_unit(tmp_path, ck, model, settings, concepts[0], **kw)["assign"]["character"] == [1, 1, 1]

    p = u["tag_probs"]["hatsune_miku"]
    median = float(np.median(p))
    for threshold, expect in ((-1.0, 1.0), (1.0, 0.0), (median, float(np.mean(np.array(p) > median)))):
        rows = checkpoint_rows(ck, concepts, [control], units, {"character": probe}, threshold, 2)
        assert rows[0]["tag_hit_rate"] == pytest.approx(expect)
        assert rows[0]["tag_mean_prob"] == pytest.approx(float(np.mean(p)))
    rows = checkpoint_rows(ck, concepts, [control], units, {"character": probe}, -1.0, 2)
    assert rows[-1]["kind"] == "control" and rows[-1]["tag_hit_rate"] == 1.0  # every control image "fires"
    hit, ctrl = rows[0]["probe_hit_rate"], rows[0]["control_rate"]
    assert rows[0]["lift"] == pytest.approx(hit - ctrl) and rows[0]["probe_chance"] == 0.5
    assert len(rows[0]["samples"]) == 2


def test_several_concepts_share_a_generation_call_and_match_units_made_alone(models, tmp_path, monkeypatch):
    """run_units fills each UNet call with up to batch_size images of several concepts; image i of a concept keeps
    seed + i, so every unit equals the unit generated alone (same seeds, same files), and units already journaled
    are not generated again."""
    import tasks.eval.stage as stage
    from PIL import Image

    model, tagger = models
    ck = EvalCheckpoint(id="ck", label="ck", spec="builtin:tiny-sd15", run="base", objective="flow", step=0)
    settings = SampleSettings(steps=2, width=64, height=64)
    long_prompt = ", ".join(f"tag{j}" for j in range(60))  # over 75 tokens: two chunks
    concepts = [Concept("character", f"c{j}", f"1girl, concept {j}", [j], [j]) for j in range(3)] + \
        [Concept("character", "c3", long_prompt, [3], [3])]
    rng = np.random.default_rng(0)
    probe = CentroidProbe.fit([c.tag for c in concepts], [rng.normal(j, 1, (3, 256)) for j in range(4)])
    kw = dict(k=3, seed=7, negative="", probes={"character": probe}, space="latent", tagger=None, tag_idx={})
    calls = []
    real = stage.generate_latents
    monkeypatch.setattr(stage, "generate_latents", lambda comp, prompts, *a, **k: calls.append(len(prompts)) or
                        real(comp, prompts, *a, **k))
    together = stage.run_units(tmp_path / "together", ck, model, settings, concepts, batch_size=4, **kw)
    assert calls == [4, 4, 1, 3]  # 9 short-prompt images, 4 a call; the two-chunk prompt never shares a call
    calls.clear()
    alone = {c.slug: stage.run_unit(tmp_path / "alone", ck, model, settings, c, batch_size=4, **kw) for c in concepts}
    assert calls == [3, 3, 3, 3]
    for c in concepts:
        assert together[c.slug]["images"] == alone[c.slug]["images"]
        for rel in together[c.slug]["images"]:
            a = np.asarray(Image.open(tmp_path / "together" / rel), np.int16)
            b = np.asarray(Image.open(tmp_path / "alone" / rel), np.int16)
            assert np.abs(a - b).max() <= 1  # the same seeds: equal up to the kernels' batch-size rounding
    calls.clear()
    (tmp_path / "together" / "units" / "ck" / f"{concepts[1].slug}.json").unlink()
    again = stage.run_units(tmp_path / "together", ck, model, settings, concepts, batch_size=4, **kw)
    assert calls == [3] and again[concepts[0].slug] == together[concepts[0].slug]
