"""Tag-rarity weights: bounded, mean exactly 1, rare concepts up, common down."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pipeline_config.tag import TagWeightConfig
from tasks.tag.weights import compute_weights, normalise_bounded, weight_tables


def _dataset():
    # 60 samples of a common character, 6 of a rare one, 2 with only an artist, 2 with no concept at all.
    chars = [["common_char"]] * 60 + [["rare_char"]] * 6 + [[]] * 4
    artists = [["big_artist"]] * 66 + [["small_artist"]] * 2 + [[]] * 2
    copyrights = [["series_a"]] * 66 + [[]] * 4
    general = [["1girl", "solo"]] * 68 + [["1girl", "scenery"], ["no_humans"]]
    return {"character": chars, "artist": artists, "copyright": copyrights}, general


def test_weights_bounded_mean_one_and_favour_rare_characters():
    concepts, general = _dataset()
    cfg = TagWeightConfig()
    res = compute_weights(concepts, general, cfg)
    w = res.weights
    assert w.shape == (70,)
    assert w.mean() == pytest.approx(1.0, abs=1e-9)
    assert w.min() >= 0.5 - 1e-12 and w.max() <= 2.0 + 1e-12
    assert w[60] > w[0]  # rare character beats common character
    assert w[0] < 1.0 < w[60]
    assert res.source[66] == "concepts" and res.source[68] == "general" and res.source[69] == "general"
    assert res.counts["character"]["common_char"] == 60


def test_bounds_hold_under_extreme_rarity():
    concepts = {"character": [["c"]] * 999 + [["unique"]], "artist": [[]] * 1000, "copyright": [[]] * 1000}
    w = compute_weights(concepts, [["x"]] * 1000, TagWeightConfig(bounds=(0.8, 1.25))).weights
    assert w.max() == pytest.approx(1.25) and w.mean() == pytest.approx(1.0, abs=1e-9)
    assert w.min() >= 0.8


def test_method_none_and_log():
    concepts, general = _dataset()
    assert (compute_weights(concepts, general, TagWeightConfig(method="none")).weights == 1).all()
    power = compute_weights(concepts, general, TagWeightConfig(method="power")).weights
    log = compute_weights(concepts, general, TagWeightConfig(method="log")).weights
    assert log.std() < power.std()  # log is the gentler curve
    assert log[60] > log[0]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=1e-6, max_value=1e6), min_size=1, max_size=200),
       st.floats(min_value=0.1, max_value=1.0), st.floats(min_value=1.0, max_value=10.0))
def test_normalise_bounded_property(raw, low, high):
    w = normalise_bounded(np.array(raw), low, high)
    assert w.mean() == pytest.approx(1.0, abs=1e-9)
    assert w.min() >= low - 1e-12 and w.max() <= high + 1e-12
    order = np.argsort(raw, kind="stable")
    assert np.all(np.diff(w[order]) >= -1e-12)  # rarity order is kept


def test_bounds_must_contain_one():
    with pytest.raises(ValueError, match="low <= 1 <= high"):
        TagWeightConfig(bounds=(1.2, 2.0))


def test_report_tables():
    concepts, general = _dataset()
    res = compute_weights(concepts, general, TagWeightConfig())
    tables = weight_tables(res, concepts, (0.5, 2.0), top=3)
    assert sum(r["samples"] for r in tables["weight_histogram"]) == 70
    assert tables["top_weight_concepts"][0]["concept"] in ("rare_char", "small_artist")
    assert tables["bottom_weight_concepts"][0]["concept"] in ("common_char", "big_artist", "series_a")
