"""The probe and the concept selection on hand-made data with known answers."""
import numpy as np
import pytest

from tasks.eval.concepts import concept_prompt, control_concepts, select_concepts, spread
from tasks.eval.probe import CentroidProbe, cover_crop, latent_features, prob_logits


def _clusters(rng, centres, n, noise):
    return [c + noise * rng.standard_normal((n, len(c))) for c in centres]


def test_centroid_probe_separates_separable_classes():
    rng = np.random.default_rng(0)
    centres = [np.array([0.0, 0.0, 5.0]), np.array([3.0, 0.0, 5.0]), np.array([0.0, 3.0, 5.0])]
    probe = CentroidProbe.fit(["a", "b", "c"], _clusters(rng, centres, 10, 0.3))
    assert probe.chance == pytest.approx(1 / 3)
    assert probe.loo_accuracy == 1.0
    test = _clusters(rng, centres, 5, 0.3)
    for k, x in enumerate(test):
        assert (probe.assign(x) == k).all()


def test_leave_one_out_accuracy_is_chance_for_overlapping_classes():
    rng = np.random.default_rng(1)
    same = [np.zeros(8)] * 4
    probe = CentroidProbe.fit(list("abcd"), _clusters(rng, same, 25, 1.0))
    assert probe.loo_accuracy < 0.45  # no real signal: near 1/4, never the in-sample optimism


def test_constant_dimensions_do_not_dominate():
    rng = np.random.default_rng(2)
    a = np.c_[rng.normal(0, 1, (10, 1)), np.zeros((10, 1))]
    b = np.c_[rng.normal(5, 1, (10, 1)), np.full((10, 1), 1e-9)]  # a near-constant dimension
    probe = CentroidProbe.fit(["a", "b"], [a, b])
    assert (probe.assign(np.array([[0.2, 1e-9], [4.8, 0.0]])) == [0, 1]).all()


def test_features():
    import torch
    from PIL import Image

    lat = torch.randn(2, 4, 40, 24)
    f = latent_features(lat)
    assert f.shape == (2, 4 * 16 * 16)
    assert latent_features(torch.randn(3, 4, 8, 8)).shape == (3, 256)
    lg = prob_logits(np.array([[0.5, 1.0, 0.0]]))
    assert lg[0, 0] == 0 and np.isfinite(lg).all()
    im = cover_crop(Image.new("RGB", (100, 50)), 64, 64)
    assert im.size == (64, 64)


ROWS = [
    {"id": i, "character": ch, "general": ["1girl", "solo", "smile"], "copyright": ["aoi_(series)"],
     "artist": [ar], "image_path": f"{i}.png"}
    for i, (ch, ar) in enumerate(
        [(["hana"], "pen")] * 6 + [(["rin"], "pen")] * 4 + [(["hana", "rin"], "ink")] * 2 + [([], "ink")] * 3)
]


def test_select_concepts_counts_thresholds_and_orders():
    got = select_concepts(ROWS, kinds=["character", "artist"], min_samples=5, max_concepts=5, reference_images=4,
                          quality=["masterpiece"])
    assert [(c.kind, c.tag, len(c.train_ids)) for c in got] == [
        ("character", "hana", 8), ("character", "rin", 6), ("artist", "pen", 10), ("artist", "ink", 5)]
    hana = got[0]
    assert len(hana.ref_ids) == 4 and set(hana.ref_ids) <= set(range(6))  # solo images only, spread
    assert hana.prompt == "1girl, solo, hana, aoi \\(series\\), masterpiece"
    assert got[2].prompt == "1girl, solo, pen, masterpiece"
    capped = select_concepts(ROWS, kinds=["character"], min_samples=1, max_concepts=1, reference_images=4,
                             quality=[])
    assert [c.tag for c in capped] == ["hana"]


def test_spread_and_controls():
    assert spread(range(10), 4) == [0, 3, 6, 9]
    assert spread([5, 1], 4) == [1, 5]
    ctrl = control_concepts(["1girl, solo", "scenery"], ["masterpiece", "good score"])
    assert [c.prompt for c in ctrl] == ["1girl, solo, masterpiece, good score", "scenery, masterpiece, good score"]
    assert concept_prompt("artist", "x_(y)", ROWS[:1], []) == "1girl, solo, x \\(y\\)"
